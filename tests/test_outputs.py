"""Output files' text (memopt/outputs.py): strict JSON."""

from __future__ import annotations

import json

from memopt.render.outputs import json_text


def test_json_is_strict_nan_and_infinity_become_null():
    text = json_text({"loss": float("nan"), "x": [float("inf"), 1.5], "y": {"z": float("-inf")}})
    assert json.loads(text) == {"loss": None, "x": [None, 1.5], "y": {"z": None}}
    assert "NaN" not in text
