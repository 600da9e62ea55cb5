"""The terminal summary of a run: one line per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def summary(result: Any) -> str:  # noqa: C901 - one branch per stage
    rows = [("stage", "seconds", "result")]
    for stage in result.stages:
        m = stage.metrics
        if stage.stage == "correct":
            if not m.get("tokens"):
                continue
            text = (f"{result.run_dir / 'teacher'}  teacher perplexity {m['perplexity_before']:.2f} -> "
                    f"{m['perplexity_after']:.2f} after {m['tokens']:,} tokens")
        elif stage.stage == "score":
            text = f"{m['method']} importance, {m['samples']} samples, {m['tokens']} tokens"
        elif stage.stage == "plan":
            s = m["shape"]
            layers = (f"layers {s['layers']}" if "layers" in s else
                      f"encoder {s['encoder_layers']} + decoder {s['decoder_layers']} layers")
            vocab = f", vocabulary {s['vocab']:,}" if s.get("vocab") else ""
            text = (
                f"hidden {s['hidden']}, mlp {s['mlp']}, heads {s['kv_heads']}x{s['heads_per_group']}, "
                f"{layers}{vocab}: {m['params'] / 1e6:.1f}M params ({m['params'] / m['teacher_params']:.2f}x)"
            )
        elif stage.stage == "distill" and "skipped" not in m:
            text = (
                f"{result.student_dir}  perplexity {m['student_perplexity_before']:.2f} -> {m['student_perplexity']:.2f} "
                f"after {m['tokens']:,} tokens ({m['tokens_per_second']:,.0f} tokens/s"
                + (f", peak learning rate backed off to {m['peak_lr']:.0e}" if m.get("lr_backoffs") else "") + ")"
                + _others(m.get("evals"), m.get("evals_before"))
            )
        elif stage.stage == "export":
            g = m["fp32"]
            first = "first token" if g.get("metric") == "continuation" else "prefill"
            text = (f"{result.run_dir / g.get('path', 'onnx/model.onnx')}, {Path(g.get('decode_path', 'decode.onnx')).name}  "
                    f"fp32 perplexity {g['perplexity']:.2f}, {g.get('total_mb', g['prefill_mb']):.0f} MB, {first} {g['prefill_latency_ms']:.0f} ms, "
                    f"decode {g['decode_tokens_per_second']:.1f} tokens/s" + _others(g.get("evals")))
        elif stage.stage == "quantize":
            if m["quant"] == "none":
                continue
            g = m[m["quant"]]
            first = "first token" if g.get("metric") == "continuation" else "prefill"
            graph = Path(g.get("path", f"model.{m['quant']}.onnx")).name
            text = (f"{graph} ({m['npu_profile']})  perplexity "
                    f"{g['perplexity']:.2f}, agreement {g['agreement']:.3f}, {g.get('total_mb', g['prefill_mb']):.0f} MB, {first} "
                    f"{g['prefill_latency_ms']:.0f} ms, decode "
                    f"{g['decode_tokens_per_second']:.1f} tokens/s, {len(m['violations'])} profile violations"
                    + _others(g.get("evals")))
        elif stage.stage == "distill" and "skipped" in m:
            text = m["skipped"]
        elif stage.stage == "report":
            text = f"{result.run_dir / 'report.md'}  {m['verdict']}"
        else:
            text = f"{result.pruned_dir}"
            if "pruned_perplexity" in m:
                text += (
                    f"  perplexity {m['teacher_perplexity']:.2f} (teacher) -> {m['pruned_perplexity']:.2f} "
                    f"on {m['validation_tokens']} validation tokens"
                    + _others(m.get("evals"), teacher=True)
                )
        rows.append((stage.stage, "reused" if stage.reused else f"{stage.seconds:.1f}", text))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows)


def _others(evals: dict[str, Any] | None, before: dict[str, Any] | None = None, teacher: bool = False) -> str:
    """The evaluation sets other than the in-domain one, as "; general-english 417.20 (teacher 39.87)"."""
    parts = []
    for name, e in (evals or {}).items():
        if name == "validation":
            continue
        start = f"{before[name]['perplexity']:.2f} -> " if before and name in before else ""
        known = f" (teacher {e['teacher_perplexity']:.2f})" if teacher and "teacher_perplexity" in e else ""
        tokens = f" on {e['tokens']:,} tokens" if "tokens" in e else ""
        parts.append(f"{name} {start}{e['perplexity']:.2f}{known}{tokens}")
    return "; " + "; ".join(parts) if parts else ""
