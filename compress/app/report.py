"""The run's report: ``report.json``, ``report.md`` and PNG plots, from what the stages measured.

Nothing here measures anything: every figure comes from a stage's ``<stage>.metrics.json`` (or
``plan.json``) of the same run directory, so the report can be rebuilt at any time with
``compress report RUN_DIR`` and always says what that run measured.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.app.report_plots import plots
from compress.core.config import STAGES, CompressConfig
from compress.errors import RunDirectoryError
from compress.families import get_family
from compress.io import read_json, write_json
from compress.sources.corpora import CORPORA, DEFAULT_CORPUS, GENERAL_EVAL

# Quality bars the verdict judges an integer graph by (relative perplexity increase over the float graph).
# A8W8: 3%, what the distilled student meets with GPTQ (benchmarks/results/quant_accuracy_*-student-a8w8.md).
BARS = {"a16w8": 0.01, "a8w8": 0.03, "w4a16": 0.03, "w8": 0.02, "w4": 0.05}


def _read(run_dir: Path, name: str) -> dict[str, Any]:
    path = run_dir / name
    return read_json(path) if path.exists() else {}


def _rows(run_dir: Path, config: dict[str, Any], m: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model or graph of the run, in pipeline order."""
    prune, distill, export, quant = m.get("prune", {}), m.get("distill", {}), m.get("export", {}), m.get("quantize", {})
    rows: list[dict[str, Any]] = []
    prune_evals = prune.get("evals", {})
    if "teacher_perplexity" in prune:
        rows.append({"name": "teacher", "kind": "torch", "path": config["teacher"], "params": prune["teacher_params"],
                     "mb": None, "perplexity": prune["teacher_perplexity"], "agreement": 1.0,
                     "evals": {k: {"perplexity": v["teacher_perplexity"], "agreement": 1.0, "tokens": v.get("tokens")}
                               for k, v in prune_evals.items() if k != "validation"}})
    if "pruned_perplexity" in prune:
        rows.append({"name": "pruned", "kind": "torch", "path": "pruned/", "params": prune["params"],
                     "mb": prune.get("pruned_mb"), "perplexity": prune["pruned_perplexity"],
                     "agreement": prune.get("pruned_agreement"), "evals": _others(prune_evals)})
    if "student_perplexity" in distill:
        rows.append({"name": "distilled", "kind": "torch", "path": "student/", "params": prune.get("params"),
                     "mb": distill.get("student_mb"), "perplexity": distill["student_perplexity"],
                     "agreement": distill.get("student_agreement"), "evals": _others(distill.get("evals", {}))})
    if "fp32" in export:
        rows.append(_graph_row("fp32 graph", export["fp32"].get("path", "onnx/model.onnx"), export["fp32"], prune.get("params")))
    if quant.get("quant", "none") != "none":
        name = quant["quant"]
        row = _graph_row(f"{name} graph ({quant['npu_profile']})", quant[name].get("path", f"onnx/model.{name}.onnx"),
                         quant[name], prune.get("params"))
        row["agreement_with_float"] = quant[name].get("agreement_with_float")
        row["decode_agreement_with_float"] = quant[name].get("decode_agreement_with_float")
        row["violations"] = len(quant["violations"])
        rows.append(row)
    return rows


def _others(evals: dict[str, Any]) -> dict[str, Any]:
    """The evaluation sets other than the in-domain validation split: {name: {perplexity, agreement}}."""
    return {k: {"perplexity": v["perplexity"], "agreement": v.get("agreement"), "tokens": v.get("tokens")}
            for k, v in evals.items() if k != "validation"}


def _graph_row(name: str, path: str, g: dict[str, Any], params: int | None) -> dict[str, Any]:
    return {"name": name, "kind": "onnx", "path": path, "decode_path": g.get("decode_path", path.replace("model.", "decode.")),
            "params": params, "mb": g.get("total_mb", g["prefill_mb"]),
            "decode_mb": g.get("decode_mb"), "perplexity": g["perplexity"], "agreement": g.get("agreement"),
            "prefill_latency_ms": g["prefill_latency_ms"], "decode_tokens_per_second": g.get("decode_tokens_per_second"),
            "decode_perplexity": g.get("decode_perplexity"), "decode_agreement": g.get("decode_agreement"),
            "decode_validation_tokens": g.get("decode_validation_tokens"), "evals": _others(g.get("evals", {}))}


def _verdict(rows: list[dict[str, Any]], m: dict[str, dict[str, Any]], student: str = "minitron") -> str:
    by_name = {r["name"]: r for r in rows}
    quant = m.get("quantize", {})
    float_graph = by_name.get("fp32 graph")
    teacher = by_name.get("teacher")
    parts = []
    if quant.get("quant", "none") != "none" and float_graph:
        name = quant["quant"]
        graph = next(r for r in rows if r["name"].startswith(f"{name} graph"))
        increase = graph["perplexity"] / float_graph["perplexity"] - 1
        bar = BARS.get(name, 0.10)
        size = graph["mb"] / float_graph["mb"]
        refused = _refused(quant.get("htp", {}))
        decode = None  # the decode graph against the float decode graph, where both were scored
        if graph.get("decode_perplexity") and float_graph.get("decode_perplexity"):
            decode = graph["decode_perplexity"] / float_graph["decode_perplexity"] - 1
        if increase <= bar and not graph["violations"] and not refused:
            parts.append(f"Ship `{graph['path']}` (with `{graph['decode_path']}`): {graph['mb']:.0f} MB, {size:.0%} of the "
                         f"float graph, perplexity {increase:+.1%} over it (bar {bar:.0%})"
                         + (f", decode graph {decode:+.1%}" if decode is not None else "")
                         + f", no {quant['npu_profile']} violations" + _compiled_clause(quant.get("htp", {})) + ".")
            if decode is not None and decode > bar:
                parts.append(f"Its decode graph, which generates every token after the first, is above the bar "
                             f"({decode:+.1%} on {graph.get('decode_validation_tokens') or 0:,} tokens): more "
                             "`--quant-decode-calib-tokens` may close it.")
        elif refused:
            parts.append(f"Do not ship `{graph['path']}` to a Qualcomm NPU yet: Qualcomm's HTP compiler refuses "
                         + ", ".join(f"{n} nodes of the {part} graph" for part, n in refused.items())
                         + " (the CPU would run them between NPU graphs); the op traces next to the graphs say which "
                         "and why.")
        elif graph["violations"]:
            parts.append(f"Do not ship `{graph['path']}` yet: it has {graph['violations']} {quant['npu_profile']} violations "
                         f"(`compress inspect {graph['path']} --npu-profile {quant['npu_profile']}` lists them).")
        else:
            instead = ("`--quant a16w8` (16-bit activations)" if name != "a16w8"
                       else get_family(student).calibration_hint)
            parts.append(f"`{graph['path']}` ({graph['mb']:.0f} MB, {size:.0%} of the float graph) costs {increase:+.1%} "
                         f"perplexity over the float graph, above the {bar:.0%} bar for {name}: ship it if that is "
                         f"acceptable, else try {instead}, or ship the float graph ({float_graph['mb']:.0f} MB).")
    elif float_graph:
        parts.append(f"Only the float graph was made (`--quant none`): `{float_graph['path']}`, {float_graph['mb']:.0f} MB.")
    student = by_name.get("distilled") or by_name.get("pruned")
    if teacher and student:
        ratio = student["perplexity"] / teacher["perplexity"]
        parts.append(f"The {student['name']} student has {student['params'] / teacher['params']:.0%} of the teacher's "
                     f"parameters and {ratio:.2f}x its perplexity in-domain"
                     + (f" (agreeing with its top-1 on {student['agreement']:.0%} of tokens)" if student.get("agreement") is not None else "")
                     + "".join(f", {v['perplexity'] / teacher['evals'][k]['perplexity']:.2f}x on {k}"
                               + (f" ({v['agreement']:.0%} agreement)" if v.get("agreement") is not None else "")
                               for k, v in student.get("evals", {}).items() if k in teacher.get("evals", {}))
                     + ".")
        general = [v["perplexity"] / teacher["evals"][k]["perplexity"] for k, v in student.get("evals", {}).items()
                   if k in teacher.get("evals", {})]
        if general and max(general) > 1.5 * ratio:
            parts.append("Off the training domain it keeps much less of the teacher than in-domain: judge it by the "
                         "general figure if it must handle text unlike the training data.")
        if "distilled" not in by_name and m.get("distill", {}).get("skipped") is None:
            parts.append("It was not distilled: run with `--stop-after report` (the default) to recover accuracy.")
        elif ratio > 1.5 and "distilled" in by_name:
            tokens = m["distill"]["tokens"]
            parts.append(f"Distillation ran {tokens:,} tokens; more (`--distill-tokens`) usually closes more of the gap.")
    return " ".join(parts) if parts else "Nothing measured yet: run more stages."


def _refused(htp: dict[str, Any]) -> dict[str, int]:
    """Part -> how many nodes Qualcomm's HTP compiler refused, for the graphs it did not take whole."""
    return {part: max(len(g["unsupported"]), 1) for part, g in htp.get("graphs", {}).items() if not g["whole"]}


def _compiled_clause(htp: dict[str, Any]) -> str:
    if not htp.get("graphs"):
        return ""
    contexts = [Path(g["context_model"]).name for g in htp["graphs"].values() if g.get("context_model")]
    return (f"; Qualcomm's HTP compiler takes every graph whole for SoC {htp['soc_model']} (compiled: "
            + ", ".join(f"`onnx/{c}`" for c in contexts) + ")")


def _htp_lines(htp: dict[str, Any] | None) -> list[str]:
    """The report's section on Qualcomm's HTP compiler and emulator."""
    if not htp:
        return []
    lines = ["## On the NPU: Qualcomm's HTP compiler", ""]
    if "skipped" in htp:
        return lines + [f"Not compiled: {htp['skipped']}.", ""]
    lines += [f"Each integer graph compiled by Qualcomm's HTP compiler (onnxruntime-qnn) for SoC {htp['soc_model']} "
              "with CPU fallback disabled: a graph the NPU runs whole is one QNN graph with no refused node.", "",
              "| graph | nodes | on the NPU | refused | QNN graphs | compile (s) | compiled model |", "|---|---|---|---|---|---|---|"]
    for g in htp["graphs"].values():
        context = f"`onnx/{Path(g['context_model']).name}`" if g.get("context_model") else "–"
        lines.append(f"| `onnx/{Path(g['graph']).name}` | {g['nodes']:,} | {g['supported_nodes']:,} | {len(g['unsupported'])} | "
                     f"{g['qnn_graphs']} | {g['seconds']:.1f} | {context} |")
    refused = [u for g in htp["graphs"].values() for u in g["unsupported"]]
    if refused:
        lines += ["", "Refused (first 10): " + "; ".join(f"{u['op_type']} `{u['name']}` ({u['reason']})" for u in refused[:10])
                  + ". Every node's mapping is in the op traces (`onnx/*.qnn_op_trace.json`)."]
    e = htp.get("emulated")
    if e:
        lines += ["", f"On the HTP emulator (the compiled graph in the NPU's own arithmetic, run on this CPU) the prefill "
                  f"graph's perplexity on the first {e['sequences']} validation sequences ({e['tokens']:,} tokens) was "
                  f"{e['perplexity']:,.2f}, against {e['cpu_perplexity']:,.2f} from ONNX Runtime's CPU on the same graph "
                  f"and sequences ({e['perplexity'] / e['cpu_perplexity'] - 1:+.2%}); their top-1 predictions agree on "
                  f"{e['agreement_with_cpu']:.1%} of tokens. The emulator took {e['seconds_per_sequence']:.0f} s per "
                  "sequence, so the sample is small: compare it with the CPU figure beside it, not with the table above."]
    return lines + [""]


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _distillation_lines(d: dict[str, Any] | None) -> list[str]:
    """The report's distillation section."""
    if not d:
        return []
    lines = ["## Distillation", "",
             f"{d['tokens']:,} training tokens in {d['steps']} steps ({d['tokens_per_second']:,.0f} tokens/s); "
             f"validation perplexity {d['perplexity_before']:,.2f} → {d['perplexity_after']:,.2f}"
             + "".join(f", {k} {v['before']:,.2f} → {v['after']:,.2f}" for k, v in d.get("others", {}).items())
             + ".", ""]
    for b in d.get("lr_backoffs", []):
        lines += [f"After step {b['step']} at peak learning rate {b['from']:.0e} the validation perplexity was "
                  f"{b['validation']:,.2f}, above the start's {b['baseline']:,.2f}: the student went back to its "
                  f"initial weights and trained the remaining {d['steps'] - b['step']} steps at peak {b['to']:.0e} "
                  "(`--distill-lr-backoffs`).", ""]
    if d.get("kept_initial"):
        trained = d["kept_initial"]["trained"]
        lines += ["Training raised the validation perplexity (to " + ", ".join(f"{k} {v:,.2f}" for k, v in trained.items())
                  + "), so the student keeps its initial weights: it started close to the teacher, and "
                  "a lower `--distill-lr` or more `--distill-tokens` may still help.", ""]
    return lines


def _markdown(report: dict[str, Any]) -> str:
    c, rows, data = report["config"], report["rows"], report["data"]
    lines = [f"# pdq-compress report: {c['teacher']} → {c['target_size']}", "",
             f"Run directory `{report['run_dir']}`, written {report['date']}.", "", "## Verdict", "", report["verdict"], "",
             "## Models and graphs", ""]
    sets = list(dict.fromkeys(k for r in rows for k in r.get("evals", {})))
    teacher = next((r for r in rows if r["name"] == "teacher"), {})
    lines += ["| | params | size (MB) | perplexity (in-domain) | top-1 agreement with teacher | "
              + "".join(f"{k} perplexity (x teacher) | {k} agreement | " for k in sets)
              + "vs float graph | prefill (ms, median) | decode (tokens/s) | profile violations |",
              "|---|---|---|---|---|" + "---|---|" * len(sets) + "---|---|---|---|"]
    for r in rows:
        other = ""
        for k in sets:
            e = r.get("evals", {}).get(k)
            known = teacher.get("evals", {}).get(k, {})
            # a ratio only on the teacher's own tokens (the graphs may be scored on fewer of them)
            same = e is not None and e.get("tokens") in (None, known.get("tokens"))
            base = known.get("perplexity") if same else None
            other += ("| – | – " if e is None else
                      f"| {e['perplexity']:,.2f}" + (f" ({e['perplexity'] / base:.2f}x)" if base else "")
                      + f" | {_fmt(e.get('agreement'), '.3f')} ")
        lines.append(
            f"| {r['name']} (`{r['path']}`) | {_fmt(r['params'] and r['params'] / 1e6, '.1f')}M | {_fmt(r['mb'], ',.0f')} | "
            f"{r['perplexity']:,.2f} | {_fmt(r.get('agreement'), '.3f')} {other}| {_fmt(r.get('agreement_with_float'), '.3f')} | "
            f"{_fmt(r.get('prefill_latency_ms'), ',.0f')} | {_fmt(r.get('decode_tokens_per_second'), '.1f')} | "
            f"{_fmt(r.get('violations'), 'd')} |")
    lines += ["", data["sentence"], ""]
    decoded = [r for r in rows if r.get("decode_perplexity") is not None]
    if decoded:
        lines += ["## Decode graphs", "",
                  f"Each decode graph scored on the second halves of the first validation sequences "
                  f"({decoded[0]['decode_validation_tokens']:,} tokens), fed one token at a time after a prefill of the "
                  "first halves (the generation path: the cache passes through the graph every step).", "",
                  "| | perplexity | top-1 agreement with teacher | vs float graph |", "|---|---|---|---|"]
        for r in decoded:
            path = r["decode_path"]
            lines.append(f"| {r['name']} (`{path}`) | {r['decode_perplexity']:,.2f} | {_fmt(r.get('decode_agreement'), '.3f')} | "
                         f"{_fmt(r.get('decode_agreement_with_float'), '.3f')} |")
        lines.append("")
    lines += _htp_lines(report["stages"].get("quantize", {}).get("htp"))
    qat = report["stages"].get("quantize", {}).get("qat")
    if qat:
        lines += [f"The {report['stages']['quantize']['quant']} graphs' int4 weights were trained on their grids after GPTQ "
                  f"(quantization-aware training, `--quant-qat-tokens`): {qat['tokens']:,} training tokens in "
                  f"{qat['seconds'] / 60:.0f} min, KL to the float model {qat['first_kl']:.4f} on the first step's "
                  f"sequences, {qat['last_kl']:.4f} on the last's.", ""]
    lines += _distillation_lines(report.get("distillation"))
    p = report.get("plan")
    if p and not p["candidates"]:
        lines += ["## Plan", "", f"{p['reason']}.", "",
                  "Shape: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p["shape"].items()) + ".", ""]
    elif p:
        trimmed = any(c["shape"].get("vocab") for c in p["candidates"])
        lines += ["## Plan", "", f"{p['reason']}.", ""]
        if trimmed:
            lines += [f"The vocabulary is an axis: every block shape takes the largest vocabulary that fits, at least the "
                      f"{p['vocab_floor']:,} tokens the training and calibration data use (with the special and byte "
                      "tokens and what they are merged from); the tokenizer is trimmed to match, and figures on text "
                      "with other tokens are per teacher token of the same text.", ""]
        lines += ["| hidden | MLP | KV heads x per group | layers |" + (" vocabulary |" if trimmed else "")
                  + " params | importance kept | calibration loss |",
                  "|---|---|---|---|" + ("---|" if trimmed else "") + "---|---|---|"]
        for cand in p["candidates"]:
            s = cand["shape"]
            mark = " **(chosen)**" if s == p["shape"] else ""
            vocab = f" {s.get('vocab') or p.get('teacher_vocab', 0):,} |" if trimmed else ""
            lines.append(f"| {s['hidden']} | {s['mlp']} | {s['kv_heads']}x{s['heads_per_group']} | {s['layers']} |{vocab} "
                         f"{cand['params'] / 1e6:.1f}M{mark} | {cand['mass']:.3f} | {_fmt(cand.get('loss'), '.4f')} |")
        lines.append("")
    if report["files"]["plots"]:
        lines += ["## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in report["files"]["plots"]] + [""]
    lines += ["## Settings", "", "```json", *_json_lines(c), "```", ""]
    return "\n".join(lines)


def _json_lines(value: dict[str, Any]) -> list[str]:
    return json.dumps(value, indent=1).splitlines()


def _data(config: dict[str, Any], m: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prune, export, score = m.get("prune", {}), m.get("export", {}), m.get("score", {})
    data = config.get("data") or DEFAULT_CORPUS
    source = f"{data} ({CORPORA[data].description})" if data in CORPORA else data
    out = {"source": source, "validation_sequences": config["eval"]["samples"],
           "validation_seq_len": config["eval"]["seq_len"], "validation_tokens": prune.get("validation_tokens"),
           "graph_seq_len": config["quant"]["seq_len"], "graph_validation_tokens": export.get("fp32", {}).get("validation_tokens"),
           "calibration_tokens": score.get("tokens"), "distillation_tokens": m.get("distill", {}).get("tokens"),
           "quant_calibration_tokens": config["quant"]["calib_samples"] * config["quant"]["seq_len"]}
    same = config["quant"]["seq_len"] == config["eval"]["seq_len"]
    out["sentence"] = (
        f"Data: {source}. Perplexity and top-1 agreement (share of next-token predictions equal to the teacher's) on "
        f"{_fmt(out['validation_tokens'], ',')} validation tokens ({config['eval']['samples']} sequences of "
        f"{config['eval']['seq_len']})"
        + (", the same sequences for the graphs (ONNX Runtime, this machine)" if same else
           f"; the graphs on {config['eval']['samples']} sequences of {config['quant']['seq_len']} tokens "
           f"({_fmt(out['graph_validation_tokens'], ',')} tokens), so compare graphs with graphs")
        + f". Importance from {_fmt(out['calibration_tokens'], ',')} calibration tokens; quantization ranges from "
        f"{out['quant_calibration_tokens']:,}."
    )
    others = [GENERAL_EVAL, *config["eval"]["data"]]
    held_out = export.get("fp32", {}).get("evals", {}).get(GENERAL_EVAL, {}).get("tokens")
    out["sentence"] += (" Held-out sets, as many sequences each and never trained on: "
                        + "; ".join(f"{o} ({CORPORA[o].description})" if o in CORPORA else o for o in others)
                        + (f"; the graphs are scored on their first {held_out:,} tokens, so compare graphs with graphs "
                           "there" if held_out else "") + ".")
    graph = export.get("fp32", {})
    if prune.get("metric") == "continuation":
        out["sentence"] += (f" The student is an encoder-decoder (Mu-like), so every row, the teacher's included, is "
                            f"scored on continuations: the first {prune['continuation_cut']} tokens of each sequence are "
                            "the input (the teacher's context), perplexity and agreement are on the rest.")
    if graph.get("metric") == "continuation":
        out["sentence"] += (f" Graph latency: median first token (encoder over a {graph['first_token_prompt_tokens']}-token "
                            f"input + one decoder step), then {graph['decode_new_tokens']} decoder steps for the decode speed.")
    elif "decode_new_tokens" in graph:
        out["sentence"] += (f" Latency: median of 10 prefill runs of {config['quant']['seq_len']} tokens; decode speed: "
                            f"{graph['decode_new_tokens']} new tokens after a {graph['decode_prompt_tokens']}-token prompt, "
                            "one decode-graph run per token with its static cache.")
    return out


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Build ``report.json``, ``report.md`` and ``report_*.png`` in ``run_dir`` from its stages' metrics."""

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise RunDirectoryError(f"{run_dir} holds no pdq-compress run (no config.json); pass a run directory")
    config = CompressConfig.from_dict(read_json(run_dir / "config.json")).to_dict()  # old flat files too
    m = {stage: _read(run_dir, f"{stage}.metrics.json") for stage in STAGES if stage != "report"}
    if not m["prune"]:
        raise RunDirectoryError(f"{run_dir} has no finished prune stage yet; rerun the compress command first")
    rows = _rows(run_dir, config, m)
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "config": config,
        "rows": rows, "data": _data(config, m), "stages": {k: v for k, v in m.items() if v},
    }
    plan = _read(run_dir, "plan.json")
    if plan:
        report["plan"] = {k: plan[k] for k in ("shape", "params", "teacher_params", "target_params", "reason", "candidates")}
        if "vocab_floor" in m.get("plan", {}):
            report["plan"].update(vocab_floor=m["plan"]["vocab_floor"], teacher_vocab=m["plan"]["teacher_vocab"])
    d = m.get("distill", {})
    if "student_perplexity" in d:
        report["distillation"] = {"tokens": d["tokens"], "steps": d["steps"], "tokens_per_second": d["tokens_per_second"],
                                  "perplexity_before": d["student_perplexity_before"], "perplexity_after": d["student_perplexity"],
                                  "history": d["history"],
                                  "others": {k: {"before": d["evals_before"][k]["perplexity"], "after": v["perplexity"]}
                                             for k, v in d.get("evals", {}).items()
                                             if k != "validation" and k in d.get("evals_before", {})},
                                  "kept_initial": d.get("kept_initial"), "lr_backoffs": d.get("lr_backoffs", []),
                                  "peak_lr": d.get("peak_lr")}
    report["verdict"] = _verdict(rows, m, config["student"])
    report["files"] = {"json": "report.json", "markdown": "report.md", "plots": plots(run_dir, report)}
    write_json(run_dir / "report.json", report)
    with tempfile.NamedTemporaryFile("w", dir=run_dir, prefix=".report.md.", delete=False) as handle:
        handle.write(_markdown(report))
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, run_dir / "report.md")
    return report
