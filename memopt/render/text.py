"""How results read as words: titles, drift, growth, inference and compare rows (shared by tables and Markdown)."""

from __future__ import annotations

from typing import Any

from memopt.core.results import RunResult, StepMemory
from memopt.core.units import format_bytes
from memopt.spec import Spec

CATEGORY_HELP = {
    "params": "weights",
    "buffers": "RoPE tables",
    "grads": "gradients",
    "optimizer": "e.g. Adam moments",
    "activations": "saved for bwd",
    "kv_cache": "keys and values",
    "unshard": "gathered params",
    "temporaries": "all else",
}
# A Keras model on TensorFlow: the same categories, read from allocator events by op name and shape
TENSORFLOW_CATEGORY_HELP = {
    **CATEGORY_HELP,
    "params": "weights (+ copies the update writes)",
    "buffers": "",
    "grads": "weight-shaped backward outputs",
    "activations": "forward outputs alive",
}


def percent_of(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def strategy_rows(strategies: dict[str, Any]) -> list[dict[str, Any]]:
    """The registry as plain data: name, options with defaults, what it saves, where it works."""
    rows = []
    for name, cls in strategies.items():
        options = {}
        for field_name, info in cls.Options.model_fields.items():
            options[field_name] = {"default": info.default, "type": _type_name(info.annotation),
                                   "help": info.description or ""}
        rows.append({"name": name, "order": cls.order, "summary": cls.summary, "saves": cls.saves,
                     "devices": list(cls.devices), "modes": list(cls.modes), "lossy": cls.lossy,
                     "options": options, "refuses": dict(cls.refuses)})
    return rows


def _type_name(annotation: Any) -> str:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is not None and args and all(isinstance(a, str) for a in args):
        return " | ".join(args)  # Literal choices
    return getattr(annotation, "__name__", str(annotation))


def _changed_categories(run: StepMemory, base: StepMemory, top: int = 2) -> str:
    """The categories whose own peak moved most against the baseline, e.g. 'activations -62%'."""
    deltas = []
    for c in base.category_peak_bytes.keys() & run.category_peak_bytes.keys():
        b, r = base.category_peak_bytes[c], run.category_peak_bytes[c]
        if b != r:
            deltas.append((abs(r - b), c, f"{c} {100 * (r - b) / b:+.0f}%" if b else f"{c} +{format_bytes(r)}"))
    return ", ".join(text for _, _, text in sorted(deltas, reverse=True)[:top]) or "-"


def compare_rows(runs: list[RunResult]) -> list[dict[str, str]]:
    """One row of display strings per run, the baseline first (shared by the Rich table and the Markdown)."""
    base = runs[0].memory
    rows = []
    for run in runs:
        vs, mem = run.vs_baseline, run.memory
        if not run.ok or mem is None:
            rows.append({"run": run.name, "peak": "-", "saving": "-", "changed": "-", "time": "-", "slowdown": "-",
                         "loss": "-", "cosine": "-", "drift": "-", "status": f"failed: {run.error}"})
            continue
        rows.append({
            "run": run.name, "peak": format_bytes(mem.peak_bytes),
            "saving": f"{100 * vs.saving:.1f}%" if vs else "-",
            "changed": _changed_categories(mem, base) if vs and base else "-",
            "time": f"{run.step_time_s * 1000:.0f} ms",
            "slowdown": vs.time_ratio.text() if vs else "-",
            "loss": "-" if run.inference is not None else f"{vs.loss_delta:+.2e}" if vs else f"{run.loss:.4f}",
            "cosine": f"{vs.grad_cosine:.6f}" if vs and vs.grad_cosine is not None else "-",
            "drift": drift_text(run.drift),
            "status": "ok",
        })
    return rows


COMPARE_COLUMNS = [("run", "run"), ("peak", "peak"), ("saving", "saving"), ("changed", "changed most"),
                   ("time", "step time"), ("slowdown", "slowdown"), ("loss", "train loss diff"), ("cosine", "grad cos"),
                   ("drift", "logit drift"), ("status", "status")]


COMPARE_LEGEND = ("train loss diff: the measured step's loss minus the baseline's, on the same batch after one "
                  "identical update (training progress, not an accuracy cost); grad cos: the warm-up step's "
                  "gradients against the baseline's; logit drift: relative error of the logits against the unchanged "
                  "model, before training, or after N identical steps (@N) where the cost shows in training "
                  "(8-bit optimizer state)")


def spec_title(spec: Spec, device: str) -> str:
    t, mode = spec.train, spec.run.mode
    if mode == "generate":
        g = spec.generate
        shape = f"generate {t.batch_size} x ({g.prompt_len} + {g.new_tokens}), {g.cache} cache"
    elif mode == "infer":
        shape = f"infer, batch {t.batch_size} x seq {t.seq_len}"
    else:
        shape = f"batch {t.batch_size} x seq {t.seq_len}, {t.optimizer}"
    ranks = f", {spec.world_size} ranks" if spec.world_size > 1 else ""
    return f"{spec.model.title()}, {shape}, {spec.run.dtype}, {device}{ranks}"


def inference_rows(facts: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Summary rows of an infer/generate run: its shape, the KV cache, time to first token, throughput."""
    if facts["mode"] == "infer":
        rows = [("Forward pass", f"{facts['batch_size']} x {facts['seq_len']}", "batch x tokens, inference_mode")]
        if "tokens_per_s" in facts:
            rows.append(("Throughput", f"{facts['tokens_per_s']:,.0f} tok/s", ""))
        return rows
    rows = [("Generation", f"{facts['batch_size']} x ({facts['prompt_len']} + {facts['new_tokens']})",
             "sequences x (prompt + new tokens), greedy"),
            ("KV cache", format_bytes(facts["kv_cache_bytes"]),
             f"{facts['cache']}, {facts['cache_positions']} positions" if facts["cache"] == "static"
             else f"{facts['cache']}, as the generation leaves it")]
    if facts["growth_bytes"]:
        rows.append(("KV cache growth at its peak", format_bytes(facts["growth_bytes"]),
                     "a layer's old and grown keys/values alive at once while concatenating"))
    if "time_to_first_token_s" in facts:
        rows.append(("Time to first token", f"{facts['time_to_first_token_s'] * 1000:.1f} ms", "the prefill"))
        tps = facts.get("decode_tokens_per_s")
        if tps:
            rows.append(("Decode throughput", f"{tps:,.1f} tok/s",
                         f"{tps / facts['batch_size']:,.1f} per sequence"))
    return rows


def drift_when(drift: dict[str, float]) -> str:
    steps = drift.get("after_steps", 0)
    return f"after {steps:g} identical training steps" if steps else "before training"


def drift_text(drift: dict[str, float] | None) -> str:
    """'0.37%': the logits' relative error against the unchanged model, or '-' for a lossless run; with held-out
    text, the loss's relative change on it first ('loss +0.42%, 1.20% logits')."""
    if not drift:
        return "-"
    loss = drift.get("held_out_loss_increase")
    held = f"loss {100 * loss:+.2f}%, " if loss is not None else ""
    if "tokens_differ" in drift:
        return f"{held}{100 * drift['tokens_differ']:.1f}% tokens, {100 * drift['logits_rel_error']:.2f}% logits"
    steps = drift.get("after_steps", 0)
    logits = f"{100 * drift['logits_rel_error']:.2f}%" + (f" @{steps:g}" if steps else "")
    return f"{held}{logits} logits" if held else logits


def growth_text(g: Any) -> str:
    """'+12.5%' for a number that grew, 'new' for one the baseline did not have."""
    return f"+{100 * g.growth:.1f}%" if g.baseline else "new"


def fit_lines(fit: Any) -> list[str]:
    if fit.fits:
        return [f"[green]fits[/green] in {format_bytes(fit.budget)} with {format_bytes(fit.margin)} to spare"]
    lines = [f"[red]does not fit[/red] in {format_bytes(fit.budget)}: {format_bytes(-fit.margin)} over"]
    if fit.helpers:
        lines.append("single strategies that would make it fit (estimated):")
        lines += [f"  {h['strategies']}: peak {format_bytes(h['peak_bytes'])}" for h in
                  sorted(fit.helpers, key=lambda h: h["peak_bytes"])]
    else:
        lines.append(f"no single strategy makes it fit ({fit.tried} tried); try combinations with memopt optimize")
    if fit.not_tried:
        lines.append(f"not tried (out of time): {', '.join(fit.not_tried)}")
    return lines


def profile_title(spec: Spec, result: RunResult) -> str:
    return f"memopt profile - {spec_title(spec, result.device)}"


def baseline_written_line(path: str, peak: int) -> str:
    return f"baseline written to {path}: peak {format_bytes(peak)}"


def apart(formula: int, traced: int) -> str:
    return f"{100 * (formula - traced) / traced:+.1f}%" if traced else "-"
