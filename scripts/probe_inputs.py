"""Probe memopt with malformed and adversarial inputs, as a new user would on day one.

Each probe runs the real command line in its own process (in a scratch folder) and checks the contract:
the expected exit code, one clear message naming the field or option, no traceback, no hang (a timeout),
and no file written or replaced but the one asked for. Prints each probe and ``N passed, M failed``;
exits 1 when any failed.

    python scripts/probe_inputs.py            # every probe (~3 minutes on 2 cores)
    python scripts/probe_inputs.py -k yaml    # the probes whose name contains "yaml"
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = (ROOT / "configs" / "tiny.yaml").read_text()
HUGE = ("model: {arch: decoder, d_model: 16384, n_heads: 128, n_layers: 48, vocab_size: 256000, max_seq_len: 512}\n"
        "train: {batch_size: 1, seq_len: 512}\nrun: {device: cpu}\n")
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


@dataclass
class Probe:
    name: str
    args: list[str]
    code: int
    says: str = ""                                        # expected in stderr+stdout
    files: dict[str, str | bytes] = field(default_factory=dict)  # written in the scratch folder first
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str], str | None] | None = None  # extra check: returns a problem or None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 120.0
    may_write: tuple[str, ...] = ()                      # files the command may create or change
    json_stdout: bool = False                            # stdout must be one JSON document (nothing else on it)


def spec(text: str) -> dict[str, str | bytes]:
    return {"spec.yaml": text}


def fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe.yaml")


def big_yaml(folder: Path) -> None:
    (folder / "big.yaml").write_text(TINY + "# " + "x" * 60 + "\n" + ("#" + "y" * 99 + "\n") * 500_000)


def same_mode(mode: int) -> Callable[[Path, str], str | None]:
    def check(folder: Path, _out: str) -> str | None:
        got = stat.S_IMODE((folder / "out.json").stat().st_mode)
        return None if got == mode else f"mode {oct(got)}, expected {oct(mode)}"
    return check


def is_link(folder: Path, _out: str) -> str | None:
    if not (folder / "link.json").is_symlink():
        return "the symlink was replaced by a file"
    return None if json.loads((folder / "target.json").read_text())["schema"] == 1 else "target not written"


def strict_json(folder: Path, out: str) -> str | None:
    text = (folder / "out.json").read_text()
    return "NaN in JSON" if "NaN" in text else None


def chmod_600(folder: Path) -> None:
    (folder / "out.json").write_text("{}")
    os.chmod(folder / "out.json", 0o600)


def link(folder: Path) -> None:
    (folder / "target.json").write_text("{}")
    (folder / "link.json").symlink_to("target.json")


BASE = {"schema": 1, "device": "cpu", "spec": {}, "runs": [{"peak_bytes": 1, "category_peak_bytes": {},
                                                            "phase_peak_bytes": {}}]}


USER_CODE = """
import os, sys
import torch
from torch import nn
print("printed at import")
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 50)
    def forward(self, x):
        print("printed in forward")
        return self.out(self.emb(x))
class ExitsInForward(Tiny):
    def forward(self, x):
        sys.exit(0)
def tiny():
    print("printed in the factory")
    return Tiny()
def exits0():
    sys.exit(0)
def exits3():
    sys.exit(3)
def hard_exit():
    os._exit(0)
def exits_in_forward():
    return ExitsInForward()
"""
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 128}
SMALL = ["--batch-size", "2", "--seq-len", "8"]


def hf(**fields: object) -> dict[str, str | bytes]:
    return {"config.json": json.dumps({**LLAMA, **fields})}


def fifo_weights(folder: Path) -> None:
    os.mkfifo(folder / "model.safetensors")


def stale_temporary(folder: Path) -> None:
    (folder / ".out.json.999999999.0123abcd.tmp").write_text("half a file")


def no_stale_temporary(folder: Path, _out: str) -> str | None:
    return "the stale temporary file is still there" if (folder / ".out.json.999999999.0123abcd.tmp").exists() \
        else None


def baseline(**run: object) -> dict[str, str | bytes]:
    doc = json.loads(json.dumps(BASE))
    doc["runs"][0].update(run)
    return {"spec.yaml": TINY, "base.json": json.dumps(doc).replace('"NAN"', "NaN")}


PROBES = [
    # -- specs --------------------------------------------------------------------------------------------------
    Probe("yaml: syntax", ["profile", "spec.yaml"], 1, "invalid YAML", spec("model: [1, 2\n")),
    Probe("yaml: unknown key", ["profile", "spec.yaml"], 1, "did you mean n_heads",
          spec(TINY.replace("n_heads", "n_head"))),
    Probe("yaml: heads do not divide", ["profile", "spec.yaml"], 1, "model.n_heads",
          spec(TINY.replace("n_heads: 4", "n_heads: 5"))),
    Probe("yaml: alias bomb", ["profile", "spec.yaml"], 1, "spec.yaml", spec(BOMB), timeout=30),
    Probe("yaml: 50 MB file", ["profile", "big.yaml"], 1, "big.yaml", setup=big_yaml, timeout=30),
    Probe("yaml: deep nesting", ["profile", "spec.yaml"], 1, "spec.yaml", spec("a: " + "[" * 100_000)),
    Probe("yaml: not UTF-8", ["profile", "spec.yaml"], 1, "spec.yaml", {"spec.yaml": b"model: {d_model: \xff}\n"}),
    Probe("input: FIFO as CONFIG", ["profile", "pipe.yaml"], 1, "pipe.yaml", setup=fifo, timeout=30),
    Probe("input: /dev/zero as CONFIG", ["profile", "/dev/zero"], 1, "/dev/zero", timeout=30),
    Probe("input: a directory", ["profile", "."], 1, "directory"),
    Probe("input: missing file", ["profile", "nope.yaml"], 1, "no such file"),
    # -- option values and spellings -----------------------------------------------------------------------------
    Probe("size: overflow", ["estimate", "spec.yaml", "--fits", "1e309GiB"], 1, "--fits", spec(TINY)),
    Probe("size: no unit, fraction", ["estimate", "spec.yaml", "--fits", "0.5"], 1, "--fits", spec(TINY)),
    Probe("size: empty", ["estimate", "spec.yaml", "--fits", ""], 1, "--fits", spec(TINY)),
    Probe("size: words", ["optimize", "spec.yaml", "--budget", "lots"], 1, "--budget", spec(TINY)),
    Probe("size: zero", ["profile", "spec.yaml", "--device-memory", "0GiB"], 1, "--device-memory", spec(TINY)),
    Probe("option: negative batch", ["profile", "spec.yaml", "--batch-size", "-3"], 1, "--batch-size", spec(TINY)),
    Probe("option: unknown dtype", ["profile", "spec.yaml", "--dtype", "int3"], 1, "--dtype", spec(TINY)),
    Probe("option: unknown device", ["profile", "spec.yaml", "--device", "tpu"], 1, "--device", spec(TINY)),
    Probe("option: tolerance NaN", ["check", "spec.yaml", "--baseline", "b.json", "--tolerance", "nan"], 1,
          "--tolerance", spec(TINY)),
    Probe("spelling: --version", ["--version"], 0, "memopt"),
    Probe("spelling: -s '+'", ["compare", "spec.yaml", "-s", "+"], 1, "--strategies", spec(TINY)),
    Probe("spelling: -s trailing comma", ["compare", "spec.yaml", "-s", "ckpt,"], 1, "--strategies", spec(TINY)),
    Probe("spelling: options then +", ["profile", "spec.yaml", "--steps", "1", "-s",
                                       "quant:bits=4,format=nf4,lora=8+chunked_ce"], 0, "quant", spec(TINY)),
    Probe("spelling: profile a + set", ["profile", "spec.yaml", "--steps", "1", "-s", "ckpt+chunked_ce"], 0,
          "chunked_ce", spec(TINY)),
    Probe("spelling: unknown strategy", ["profile", "spec.yaml", "-s", "ckpz"], 1, "did you mean ckpt", spec(TINY)),
    Probe("spelling: --json never takes a value", ["estimate", "--json", "gpt2", "--batch-size", "1", "--seq-len", "8"],
          0, '"d_model": 768'),
    Probe("spelling: old --json FILE", ["profile", "--json", "out.json"], 1, "--json-out"),
    Probe("compare: refused set before any run", ["compare", "spec.yaml", "-s", "ckpt,accum+optim_in_bwd"], 1,
          "refused", spec(TINY)),
    # -- output files ---------------------------------------------------------------------------------------------
    Probe("output: /dev/null stays a device", ["estimate", "spec.yaml", "--json-out", "/dev/null"], 0, "", spec(TINY),
          check=lambda _f, _o: None if stat.S_ISCHR(os.stat("/dev/null").st_mode) else "/dev/null replaced"),
    Probe("output: /dev/full", ["estimate", "spec.yaml", "--json-out", "/dev/full"], 1, "/dev/full", spec(TINY)),
    Probe("output: symlink followed", ["estimate", "spec.yaml", "--json-out", "link.json"], 0, "", spec(TINY),
          setup=link, check=is_link, may_write=("target.json",)),
    Probe("output: mode 0600 kept", ["estimate", "spec.yaml", "--json-out", "out.json"], 0, "", spec(TINY),
          setup=chmod_600, check=same_mode(0o600), may_write=("out.json",)),
    Probe("output: the spec itself", ["compare", "spec.yaml", "-s", "ckpt", "--markdown", "spec.yaml"], 1,
          "spec.yaml", spec(TINY)),
    Probe("output: check --update onto the spec", ["check", "spec.yaml", "--baseline", "spec.yaml", "--update"], 1,
          "spec.yaml", spec(TINY)),
    Probe("output: failed compare writes nothing", ["compare", "spec.yaml", "-s", "ckpt", "--device-memory", "3MiB",
                                                     "--json-out", "out.json"], 1, "baseline failed", spec(TINY)),
    Probe("output: float16 NaN is strict JSON", ["profile", "spec.yaml", "--steps", "1", "--dtype", "float16",
                                                 "--json-out", "out.json"], 0, "", spec(TINY), check=strict_json,
          may_write=("out.json",)),
    # -- inputs that must not exhaust the machine --------------------------------------------------------------------
    Probe("huge: profile refused with its estimate", ["profile", "huge.yaml"], 1, "estimated peak",
          {"huge.yaml": HUGE}, timeout=120),
    Probe("huge: estimate --fits is bounded", ["estimate", "huge.yaml", "--fits", "24GiB"], 0, "does not fit",
          {"huge.yaml": HUGE}, timeout=120),
    # -- ranks: checked before any starts ----------------------------------------------------------------------------
    Probe("ranks: 1000 refused before any starts", ["profile", "spec.yaml", "--batch-size", "1000", "--world-size",
                                                    "1000"], 1, "nothing was started", spec(TINY), timeout=60),
    Probe("ranks: batch does not split", ["profile", "spec.yaml", "--world-size", "3"], 1, "does not split over 3",
          spec(TINY), timeout=60),
    # -- user code cannot fake a result ------------------------------------------------------------------------------
    Probe("user code: factory sys.exit(0)", ["profile", "--model", "usermod:exits0", *SMALL], 1,
          "usermod:exits0 called sys.exit(0)", {"usermod.py": USER_CODE}),
    Probe("user code: factory sys.exit(3)", ["profile", "--model", "usermod:exits3", *SMALL], 1,
          "usermod:exits3 called sys.exit(3)", {"usermod.py": USER_CODE}),
    Probe("user code: factory os._exit(0)", ["profile", "--model", "usermod:hard_exit", *SMALL], 1,
          "usermod:hard_exit called os._exit(0)", {"usermod.py": USER_CODE}),
    Probe("user code: sys.exit in forward", ["profile", "--model", "usermod:exits_in_forward", *SMALL], 1,
          "forward called sys.exit(0)", {"usermod.py": USER_CODE}),
    Probe("user code: prints keep --json clean", ["profile", "--model", "usermod:tiny", *SMALL, "--json"], 0,
          "printed in forward", {"usermod.py": USER_CODE}, json_stdout=True),
    Probe("user code: rank whose factory exits", ["profile", "--model", "usermod:exits0", *SMALL, "--world-size",
                                                  "2", "--no-fit-check"], 1, "called sys.exit(0)",
          {"usermod.py": USER_CODE}),
    # -- Hugging Face inputs that would hang (need memopt[hf]) -------------------------------------------------------
    Probe("hf: vocab_size 10**12", ["profile", "--hf", "config.json", *SMALL], 1, "vocab_size", hf(vocab_size=10**12),
          timeout=60),
    Probe("hf: zero layers", ["estimate", "--hf", "config.json", *SMALL], 1, "num_hidden_layers",
          hf(num_hidden_layers=0), timeout=60),
    Probe("hf: kv heads do not divide", ["estimate", "--hf", "config.json", *SMALL], 1, "num_key_value_heads",
          hf(num_key_value_heads=3), timeout=60),
    Probe("hf: negative ffn", ["estimate", "--hf", "config.json", *SMALL], 1, "intermediate_size",
          hf(intermediate_size=-176), timeout=60),
    Probe("hf: FIFO as weights (estimate)", ["estimate", "--hf", ".", *SMALL], 1, "FIFO", hf(), setup=fifo_weights,
          timeout=60),
    Probe("hf: FIFO as weights (profile)", ["profile", "--hf", ".", *SMALL], 1, "FIFO", hf(), setup=fifo_weights,
          timeout=60),
    # -- a write killed mid-way -----------------------------------------------------------------------------------
    Probe("output: stale .tmp of a killed write removed", ["estimate", "spec.yaml", "--json-out", "out.json"], 0, "",
          spec(TINY), setup=stale_temporary, check=no_stale_temporary, may_write=("out.json",)),
    # -- baselines ---------------------------------------------------------------------------------------------------
    Probe("baseline: NaN peak", ["check", "spec.yaml", "--baseline", "base.json"], 1, "peak_bytes",
          baseline(peak_bytes="NAN")),
    Probe("baseline: negative peak", ["check", "spec.yaml", "--baseline", "base.json"], 1, "peak_bytes",
          baseline(peak_bytes=-5)),
    Probe("baseline: string peak", ["check", "spec.yaml", "--baseline", "base.json"], 1, "peak_bytes",
          baseline(peak_bytes="big")),
    Probe("baseline: deep nesting", ["check", "spec.yaml", "--baseline", "base.json"], 1, "base.json",
          {"spec.yaml": TINY, "base.json": "[" * 100_000}),
    # -- output that reads everywhere --------------------------------------------------------------------------------
    Probe("locale: ASCII compare", ["compare", "spec.yaml", "-s", "ckpt", "--steps", "1"], 0, "train loss diff",
          spec(TINY), env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}),
    Probe("locale: Latin-1 error message", ["profile", "spec.yaml", "-s", "ckpτ"], 1, "unknown strategy", spec(TINY),
          env={"PYTHONIOENCODING": "latin-1"}),
]


def run_probe(probe: Probe) -> tuple[Probe, str | None, float]:
    """(probe, problem or None, seconds)."""
    with tempfile.TemporaryDirectory(prefix="memopt-probe-") as tmp:
        folder = Path(tmp)
        for name, data in probe.files.items():
            (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        if probe.setup:
            probe.setup(folder)
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.is_symlink()}
        env = {**os.environ, "COLUMNS": "100", "PYTHONDONTWRITEBYTECODE": "1", **probe.env}  # no __pycache__ here
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "memopt.cli", *probe.args], cwd=folder, env=env,
                                  capture_output=True, timeout=probe.timeout)
        except subprocess.TimeoutExpired:
            return probe, f"hung (no answer in {probe.timeout:.0f} s)", time.perf_counter() - started
        seconds = time.perf_counter() - started
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        problems = contract_problems(probe, proc, out, folder, before)
        last = out.strip().splitlines()[-1:] if problems else []
        return probe, ("; ".join(problems) + (f" [{last[0][:160]}]" if last else "")) or None, seconds


def contract_problems(probe: Probe, proc: subprocess.CompletedProcess[bytes], out: str, folder: Path,
                      before: dict[str, int]) -> list[str]:
    """What the run did against the contract: exit code, message, no traceback, no other file written, JSON."""
    problems = []
    if proc.returncode != probe.code:
        problems.append(f"exit {proc.returncode}, expected {probe.code}")
    if probe.says and probe.says not in out:
        problems.append(f"output lacks {probe.says!r}")
    if "Traceback" in out:
        problems.append("a traceback")
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.is_symlink()}
    changed = sorted(n for n in after if before.get(n) != after[n] and n not in probe.may_write)
    if changed:
        problems.append(f"wrote {', '.join(changed)}")
    if probe.json_stdout:
        try:
            json.loads(proc.stdout)
        except ValueError:
            problems.append("stdout is not one JSON document")
    if not problems and probe.check:
        extra = probe.check(folder, out)
        if extra:
            problems.append(extra)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the probes whose name contains this")
    parser.add_argument("-j", type=int, default=2, help="probes run at once")
    args = parser.parse_args()
    chosen = [p for p in PROBES if args.k in p.name]
    failed = 0
    with ThreadPoolExecutor(max_workers=args.j) as pool:
        for probe, problem, seconds in pool.map(run_probe, chosen):
            failed += problem is not None
            print(f"{'ok  ' if problem is None else 'FAIL'} {probe.name:45s} {seconds:6.1f} s"
                  + (f"  {problem}" if problem else ""), flush=True)
    print(f"{len(chosen) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
