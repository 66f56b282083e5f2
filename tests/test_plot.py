"""Pictures: the step's timeline files (PNG and HTML) peak where the run peaked."""

from __future__ import annotations

import json
import re

import pytest

from .helpers import CONFIGS, invoke


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_timeline_files_peak_at_the_runs_peak(tmp_path, suffix):
    target = tmp_path / f"timeline{suffix}"
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--timeline", target, "--json-out", tmp_path / "p.json"])
    assert result.exit_code == 0, result.output
    peak = json.loads((tmp_path / "p.json").read_text())["runs"][0]["peak_bytes"]
    if suffix == ".png":
        from PIL import Image  # comes with matplotlib

        data = json.loads(Image.open(target).text["memopt-timeline"])
    else:
        page = target.read_text()
        run = json.loads(re.search(r'<script type="application/json" id="memopt-timeline">(.*?)</script>', page,
                                   re.S).group(1))["runs"][0]
        data = {"bytes": run["samples"]["bytes"], "peak_bytes": run["peak_bytes"],
                "phases": [run["names"][i] for i in run["samples"]["phase"]]}
    assert max(sum(b) for b in data["bytes"]) == peak == data["peak_bytes"]
    assert set(data["phases"]) == {"forward", "backward", "optimizer"}
