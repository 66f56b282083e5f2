"""The step's event-level files: --snapshot (read by PyTorch's own memory_viz helpers), --trace (Chrome), memopt
view of a snapshot (memopt's own, one built by hand in PyTorch's documented format, and on a GPU one PyTorch
recorded), and the refusals around them."""

from __future__ import annotations

import json
import pickle
import textwrap

import pytest
import torch

from memopt.core.trace import Allocation, MemoryTrace
from memopt.render.report_html import run_view, thinned

from .helpers import CONFIGS, invoke

memory_viz = pytest.importorskip("torch.cuda._memory_viz")


def snapshot_peak(snapshot: dict, device: int = 0) -> int:
    """The highest live total over a snapshot's trace, computed from the snapshot alone: the blocks alive at its
    end, walked back over the events to the start, then forward."""
    live = sum(b["size"] for s in snapshot["segments"] if s["device"] == device for b in s["blocks"]
               if b["state"] == "active_allocated")
    events = snapshot["device_traces"][device]
    for e in reversed(events):
        live += {"alloc": -e["size"], "free_completed": e["size"]}.get(e["action"], 0)
    peak = live
    for e in events:
        live += {"alloc": e["size"], "free_completed": -e["size"]}.get(e["action"], 0)
        peak = max(peak, live)
    return peak


def _profile(tmp_path, *args):
    doc = tmp_path / "run.json"
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--json-out", doc, *args])
    assert result.exit_code == 0, result.output
    return json.loads(doc.read_text())["runs"][0]


@pytest.mark.parametrize("strategies", [[], ["-s", "offload_states:params=true"]], ids=["baseline", "resizes"])
def test_snapshot_loads_in_memory_viz_and_peaks_at_the_runs_peak(tmp_path, strategies):
    target = tmp_path / "step.pickle"
    run = _profile(tmp_path, "--snapshot", target, *strategies)
    snapshot = pickle.loads(target.read_bytes())
    assert snapshot_peak(snapshot) == run["peak_bytes"]
    summary = memory_viz.segsum(snapshot)  # checks its own accounting (raises on a mismatch)
    end = sum(b["size"] for s in snapshot["segments"] for b in s["blocks"])
    assert f"total_allocated: {memory_viz.Bytes(end)}" in summary
    assert "entries" in memory_viz.trace(snapshot)
    assert "snapshot.pickle" in memory_viz.trace_plot(snapshot)
    flame = memory_viz.memory(snapshot, format_flamegraph=lambda lines: lines)
    assert sum(int(line.rsplit(" ", 1)[1]) for line in flame.splitlines()) == end
    if strategies:  # parameters released and brought back: frees and allocs at the same address
        actions = [e["action"] for e in snapshot["device_traces"][0]]
        assert actions.count("alloc") > 0 and actions.count("free_completed") > 0
    viewed = invoke(["view", target, "--json"])
    assert viewed.exit_code == 0, viewed.output
    assert json.loads(viewed.stdout)["peak_bytes"] == run["peak_bytes"]
    shown = invoke(["view", target])
    assert f"{run['peak_bytes']:,} B" in shown.stdout


def test_trace_counters_peak_at_the_runs_peak(tmp_path):
    target = tmp_path / "step.json"
    run = _profile(tmp_path, "--trace", target)
    trace = json.loads(target.read_text())
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert max(e["args"]["bytes"] for e in counters if e["name"] == "total") == run["peak_bytes"]
    for category, nbytes in run["category_peak_bytes"].items():
        assert max((e["args"]["bytes"] for e in counters if e["name"] == category), default=0) == nbytes
    slices = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "phase"}
    assert slices == {"forward", "backward", "optimizer"}
    assert any(e["ph"] == "X" and e["cat"] == "module" and e["name"] == "loss_head" for e in trace["traceEvents"])


def test_stacks_name_the_models_own_lines(tmp_path):
    target = tmp_path / "step.pickle"
    _profile(tmp_path, "--snapshot", target, "--stacks")
    frames = [f for e in pickle.loads(target.read_bytes())["device_traces"][0] for f in e["frames"]]
    assert any(f["filename"].endswith("memopt/model/transformer.py") for f in frames)
    assert not any(f["filename"].endswith("memopt/measure/tracker.py") for f in frames)


def test_estimate_writes_the_same_files_from_fake_tensors(tmp_path):
    page, snap, doc = tmp_path / "e.html", tmp_path / "e.pickle", tmp_path / "e.json"
    result = invoke(["estimate", CONFIGS / "tiny.yaml", "--html", page, "--snapshot", snap, "--json-out", doc])
    assert result.exit_code == 0, result.output
    peak = json.loads(doc.read_text())["runs"][0]["peak_bytes"]
    assert snapshot_peak(pickle.loads(snap.read_bytes())) == peak
    assert f'"peak_bytes":{peak}' in page.read_text()


def test_memopt_run_and_track_write_them_for_a_users_loop(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
        opt = torch.optim.AdamW(model.parameters())
        for _ in range(3):
            model(torch.randn(32, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    """))
    page, doc = tmp_path / "run.html", tmp_path / "run.json"
    result = invoke(["run", "--html", page, "--json-out", doc, "--device", "cpu", script])
    assert result.exit_code == 0, result.output
    assert f'"peak_bytes":{json.loads(doc.read_text())["runs"][0]["peak_bytes"]}' in page.read_text()

    import memopt

    model = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memopt.track(model, opt, timeline=True) as t:
        model(torch.randn(8, 32)).sum().backward()
        opt.step()
    t.save(tmp_path / "t.pickle")
    t.save(tmp_path / "t.json")
    assert snapshot_peak(pickle.loads((tmp_path / "t.pickle").read_bytes())) == t.result.memory.peak_bytes
    with pytest.raises(Exception, match="use a .html, .pickle or .json"):
        t.save(tmp_path / "t.txt")
    with memopt.track(model, opt) as plain:
        model(torch.randn(8, 32)).sum().backward()
    with pytest.raises(Exception, match="timeline=True"):
        plain.save(tmp_path / "p.html")


def _block(address, size, frames, state="active_allocated"):
    return {"address": address, "size": size, "requested_size": size, "state": state, "frames": frames}


def _frames(*where):
    return [{"filename": f, "line": line, "name": name} for f, line, name in where]


USER = ("/home/me/train.py", 42, "train_step")
MODEL = ("/home/me/model.py", 7, "forward")
TORCH = ("/venv/lib/python3.11/site-packages/torch/nn/functional.py", 2000, "linear")
CPP = ("??", 0, "c10::cuda::CUDACachingAllocator::malloc")


def handmade_snapshot() -> dict:
    """A snapshot in the layout torch.cuda.memory._snapshot() documents: a 1 MiB block alive from before the trace
    (the weights), a 4 MiB activation made in the model and freed, two 2 MiB temporaries of the loop, one of them
    alive at the end; on device 1 a smaller trace."""
    mib = 2**20
    weights = _block(0x1000, mib, _frames(CPP, TORCH, MODEL, USER))
    alive = _block(0x1000 + mib, 2 * mib, _frames(CPP, TORCH, USER))
    free_space = _block(0x1000 + 3 * mib, 5 * mib, [], state="inactive")
    segment = {"device": 0, "address": 0x1000, "total_size": 8 * mib, "allocated_size": 3 * mib,
               "active_size": 3 * mib, "requested_size": 3 * mib, "stream": 0, "segment_type": "large",
               "segment_pool_id": (0, 0), "is_expandable": False, "frames": [],
               "blocks": [weights, alive, free_space]}
    act = 0x1000 + 3 * mib
    events = [
        {"action": "alloc", "addr": act, "size": 4 * mib, "stream": 0, "time_us": 10,
         "frames": _frames(CPP, TORCH, MODEL, USER)},
        {"action": "alloc", "addr": 0x1000 + mib, "size": 2 * mib, "stream": 0, "time_us": 20,
         "frames": _frames(CPP, TORCH, USER)},
        {"action": "free_requested", "addr": act, "size": 4 * mib, "stream": 0, "time_us": 30, "frames": []},
        {"action": "free_completed", "addr": act, "size": 4 * mib, "stream": 0, "time_us": 31, "frames": []},
        {"action": "alloc", "addr": act, "size": 2 * mib, "stream": 0, "time_us": 40,
         "frames": _frames(CPP, TORCH, USER)},
        {"action": "free_requested", "addr": act, "size": 2 * mib, "stream": 0, "time_us": 50, "frames": []},
        {"action": "free_completed", "addr": act, "size": 2 * mib, "stream": 0, "time_us": 51, "frames": []},
    ]
    other = {**segment, "device": 1, "blocks": [_block(0x9000, mib, _frames(USER))], "total_size": mib,
             "allocated_size": mib}
    device1 = [{"action": "alloc", "addr": 0x9000, "size": mib, "stream": 0, "time_us": 5, "frames": _frames(USER)}]
    return {"segments": [segment, other], "device_traces": [events, device1]}


def test_view_reads_a_handmade_snapshot(tmp_path):
    path = tmp_path / "snapshot.pickle"
    snapshot = handmade_snapshot()
    path.write_bytes(pickle.dumps(snapshot))
    assert snapshot_peak(snapshot) == 7 * 2**20  # weights + activation + the first temporary
    memory_viz.segsum(snapshot)  # the hand-built layout is one PyTorch's helpers accept
    result = invoke(["view", path, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["device"] == 0 and doc["devices"] == {"0": 7 * 2**20, "1": 2**20}
    assert doc["peak_bytes"] == 7 * 2**20 and doc["alive_at_peak_count"] == 3
    assert [a["bytes"] for a in doc["alive_at_peak"]] == [4 * 2**20, 2 * 2**20, 2**20]
    assert doc["alive_at_peak"][0]["top_frame"] == "forward (model.py:7)"
    assert doc["groups"] == [{"top_frame": "forward (model.py:7)", "bytes": 5 * 2**20, "allocations": 2},
                             {"top_frame": "train_step (train.py:42)", "bytes": 2 * 2**20, "allocations": 1}]
    one = json.loads(invoke(["view", path, "--device", "1", "--json"]).stdout)
    assert one["peak_bytes"] == 2**20
    page = tmp_path / "view.html"
    assert invoke(["view", path, "--html", page]).exit_code == 0
    assert '"peak_bytes":7340032' in page.read_text()


def test_view_of_a_snapshot_without_history_reports_the_state_it_holds(tmp_path):
    snapshot = handmade_snapshot()
    snapshot["device_traces"] = [[], []]
    path = tmp_path / "state.pickle"
    path.write_bytes(pickle.dumps(snapshot))
    doc = json.loads(invoke(["view", path, "--json"]).stdout)
    assert doc["peak_bytes"] == 3 * 2**20 and "no recorded events" in doc["note"]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    (b"not a pickle at all", "not a PyTorch memory snapshot"),
    (pickle.dumps([1, 2, 3]), "no 'segments' list"),
    (b"cos\nsystem\n(S'touch /tmp/memopt-pwned'\ntR.", "only plain data"),
    (pickle.dumps({"segments": [{"device": 0, "blocks": [{"state": "active_allocated"}]}]}), "not in the format"),
])
def test_view_refuses_what_is_not_a_snapshot(tmp_path, content, message):
    path = tmp_path / "bad.pickle"
    if content is not None:
        path.write_bytes(content)
    result = invoke(["view", path])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_view_refuses_a_directory_and_an_unknown_device(tmp_path):
    assert "is a directory" in invoke(["view", tmp_path]).output
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps(handmade_snapshot()))
    result = invoke(["view", path, "--device", "3"])
    assert result.exit_code == 1 and "--device 3: the snapshot has devices 0, 1" in result.output


@pytest.mark.parametrize("args, message", [
    (["profile", "--html", "x.txt"], "--html x.txt: use a .html or .htm file name"),
    (["profile", "--snapshot", "x.json"], "--snapshot x.json: use a .pickle or .pkl file name"),
    (["profile", "--trace", "x.html"], "--trace x.html: use a .json file name"),
    (["profile", "--stacks"], "--stacks: the stacks go into --html or --snapshot"),
    (["profile", "--world-size", "2", "--html", "x.html"], "with --world-size, estimate traces one rank"),
    (["profile", "--html", "same.html", "--timeline", "same.html"], "both name"),
])
def test_export_options_are_checked_before_anything_runs(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke([*args[:1], CONFIGS / "tiny.yaml", *args[1:]])
    assert result.exit_code == 1 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_memory_trace_alive_at_the_peak_adds_up_and_thinning_keeps_the_peak():
    trace = MemoryTrace(["a", "b"])
    trace.allocations = [Allocation(10, "a"), Allocation(5, "b", start=1, end=3),
                         Allocation(7, "a", start=2, changes=[(3, "b", 7)])]
    for kind, subject, live in [("start", -1, [10, 0]), ("alloc", 1, [10, 5]), ("alloc", 2, [17, 5]),
                                ("free", 1, [17, 0]), ("move", 2, [10, 7])]:
        trace.record(kind, subject, "forward", None, live, 0)
    assert trace.peak_index() == 2 and trace.peak_bytes() == 22
    assert sum(x.nbytes for x in trace.alive_at(2)) == 22
    assert [(x.category, x.nbytes) for x in trace.alive_at(4)] == [("a", 10), ("b", 7)]
    assert MemoryTrace.from_json(json.loads(json.dumps(trace.to_json()))) == trace
    totals = [i % 97 for i in range(100_000)]
    totals[54_321] = 1_000
    kept = thinned(totals, 54_321)
    assert len(kept) <= 4001 and 54_321 in kept
    assert run_view("r", trace)["peak_bytes"] == 22


@pytest.mark.cuda
def test_view_reads_a_snapshot_pytorch_recorded_on_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        x = torch.randn(1024, 1024, device="cuda")
        y = x @ x  # 4 MiB more
        del y
        path = tmp_path / "gpu.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    doc = json.loads(invoke(["view", path, "--json"]).stdout)
    assert doc["peak_bytes"] == snapshot_peak(pickle.loads(path.read_bytes()), doc["device"]) >= 8 * 2**20
    assert doc["groups"][0]["top_frame"].startswith("test_view_reads_a_snapshot_pytorch_recorded_on_the_gpu")
