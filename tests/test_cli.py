import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from factories import tiny_llama, write_corpus, write_teacher
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from compress.app.cli import main

SMALL = ["--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4", "--eval-seq-len", "16",
         "--align", "16", "--tolerance", "0.15", "--search-candidates", "3", "--batch-size", "4", "--quiet",
         "--stop-after", "prune"]  # a later --stop-after overrides


@pytest.fixture
def inputs(tmp_path):
    return write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=3)), write_corpus(tmp_path)


def _run(*argv):
    return main([str(a) for a in argv])


def test_prune_end_to_end_writes_a_reloadable_checkpoint_and_reuses_stages(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    out = tmp_path / "run"
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL) == 0
    for name in ("config.json", "scores.safetensors", "plan.json", "pruned/config.json", "pruned/model.safetensors",
                 "pruned/tokenizer.json"):
        assert (out / name).exists(), name
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["params"] - 0.7 * plan["teacher_params"]) <= 0.15 * 0.7 * plan["teacher_params"]
    assert plan["candidates"] and plan["reason"]
    model, info = AutoModelForCausalLM.from_pretrained(out / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == plan["params"]
    metrics = json.loads((out / "prune.metrics.json").read_text())
    assert metrics["pruned_perplexity"] > 0 and metrics["teacher_perplexity"] > 0
    first = capsys.readouterr().out
    assert "perplexity" in first

    mtime = (out / "pruned" / "model.safetensors").stat().st_mtime_ns
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL) == 0
    assert capsys.readouterr().out.count("reused") == 3
    assert (out / "pruned" / "model.safetensors").stat().st_mtime_ns == mtime

    # A changed target re-plans and re-prunes but keeps the importance scores.
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.5x", "--out", out, *SMALL) == 0
    summary = capsys.readouterr().out
    assert summary.count("reused") == 1 and summary.splitlines()[1].startswith("score")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_magnitude_and_random_importance_run_without_calibration(inputs, tmp_path):
    teacher, corpus = inputs
    for method in ("magnitude", "random"):
        out = tmp_path / method
        assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out,
                    "--importance", method, *SMALL) == 0
        assert json.loads((out / "plan.json").read_text())["importance"] == method


def _error_of(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    out = tmp_path / "out"
    cases = [
        (["--teacher", tmp_path / "missing-dir"], "no such file"),
        (["--teacher", "not-a-model-anywhere"], "not a built-in alias"),
        (["--teacher", teacher, "--data", tmp_path / "nothing.txt"], "no such file"),
        (["--teacher", teacher, "--target-size", "3x"], "larger than the teacher"),
        (["--teacher", teacher, "--target-size", "1K"], "nearest feasible sizes"),
        (["--teacher", teacher, "--target-size", "huge"], "--target-size"),
        (["--teacher", teacher, "--align", "48"], "--align"),
    ]
    for argv, message in cases:
        args = [*argv]
        if "--data" not in args:
            args += ["--data", corpus]
        if "--target-size" not in args:
            args += ["--target-size", "0.7x"]
        assert _run(*SMALL, "--out", out, *args) == 2, argv
        assert message in _error_of(capsys), argv
        assert not out.exists(), f"{argv} left {out}"


def test_unsupported_architecture_is_named(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    write_teacher(tmp_path)  # only for its tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tmp_path / "teacher" / name).read_bytes())
    assert _run("--teacher", folder, "--data", write_corpus(tmp_path), "--target-size", "0.7x",
                "--out", tmp_path / "o", *SMALL) == 2
    assert "gpt2" in _error_of(capsys)


def test_foreign_output_folder_is_refused(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", foreign, *SMALL) == 2
    assert "not empty" in _error_of(capsys)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


def test_print_config_and_help_work_as_a_subprocess(tmp_path):
    env = {**os.environ, "PDQ_CACHE": str(tmp_path)}
    shown = subprocess.run([sys.executable, "-m", "compress.app.cli", "--target-size", "50%", "--print-config"],
                           capture_output=True, text=True, env=env, check=True)
    assert json.loads(shown.stdout)["target_size"] == "50%"
    helped = subprocess.run([sys.executable, "-m", "compress.app.cli", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--target-size" in helped.stdout and "examples:" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "compress.app.cli", "--target-size", "x"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_the_terminal_shows_stage_lines_while_run_log_keeps_the_configuration(inputs, tmp_path):
    teacher, corpus = inputs
    out = tmp_path / "run"
    argv = [a for a in SMALL if a != "--quiet"][:-2]  # with log lines, through the export
    env = {**os.environ, "PDQ_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "compress", "--teacher", str(teacher), "--data", str(corpus),
                           "--target-size", "0.7x", "--out", str(out), "--quant", "none", "--stop-after", "export",
                           "--distill-tokens", "256", "--distill-seq-len", "16", "--distill-batch-size", "4",
                           "--seq-len", "16", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert any(line.startswith("stage export") for line in lines)
    # No line of other libraries' INFO chatter (the exporter's optimizer: "Replaced initializer ..."), no
    # configuration dump.
    noise = [line for line in lines if "initializer" in line or "Warning" in line or len(line) > 300]
    assert not noise, noise[:5]
    log = (out / "run.log").read_text()
    assert "stage export" in log and '"teacher":' in log and "Replaced initializer" not in log


def test_eval_subcommand_on_a_text_file(inputs, tmp_path, capsys):
    teacher, _ = inputs
    text = tmp_path / "notes.txt"
    text.write_text("The kernel schedules tasks on every processor. " * 50)
    assert _run("eval", teacher, "--text", text, "--seq-len", "16") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["data"] == str(text)
    assert _run("eval", teacher, "--text", tmp_path / "none.txt") == 2


def test_cli_flags_map_one_to_one_onto_the_config():
    import dataclasses

    from compress.app.cli import _parser
    from compress.core.config import FLAGS, SECTIONS, CompressConfig

    flags = {a.dest for a in _parser()._actions} - {"help", "config", "print_config", "quiet"}
    top = {f.name for f in dataclasses.fields(CompressConfig)} - set(SECTIONS)
    fields = top | {f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(getattr(CompressConfig(), section))}
    named = top | {".".join(FLAGS[f]) for f in flags - top}
    assert named == fields - {"distill.bf16", "distill.seed", "distill.hidden_pairs"}  # --bf16, --seed; a config file
    assert len(flags) == len(named)


def test_teacher_correction_fine_tunes_the_teacher_before_scoring(inputs, tmp_path):
    teacher, corpus = inputs
    out = tmp_path / "corrected"
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL,
                "--teacher-correction-tokens", "2048", "--teacher-correction-lr", "3e-3", "--distill-seq-len", "16") == 0
    metrics = json.loads((out / "correct.metrics.json").read_text())
    assert metrics["tokens"] >= 2048 and metrics["perplexity_after"] < metrics["perplexity_before"]
    corrected = AutoModelForCausalLM.from_pretrained(out / "teacher")
    original = AutoModelForCausalLM.from_pretrained(teacher)
    assert any(not torch.equal(a, b) for a, b in zip(corrected.state_dict().values(), original.state_dict().values(), strict=True))
    assert json.loads((out / "prune.metrics.json").read_text())["teacher_perplexity"] == pytest.approx(metrics["perplexity_after"], rel=1e-4)


def test_distill_stage_end_to_end_on_a_tiny_model(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    out = tmp_path / "distilled"
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL,
                "--stop-after", "distill", "--distill-tokens", "2048", "--distill-seq-len", "16",
                "--distill-batch-size", "4", "--distill-lr", "3e-3", "--distill-eval-every", "8") == 0
    assert "distill" in capsys.readouterr().out
    metrics = json.loads((out / "distill.metrics.json").read_text())
    assert metrics["tokens"] == 2048 and metrics["steps"] == 32
    # Every 8 steps, and once right after the 8 warmup steps: the learning-rate guard's check, passed here.
    assert [r["step"] for r in metrics["history"] if "val_perplexity" in r] == [8, 9, 16, 24, 32]
    assert metrics["lr_backoffs"] == [] and metrics["peak_lr"] == 3e-3
    student, info = AutoModelForCausalLM.from_pretrained(out / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), pruned.state_dict().values(), strict=True))


def test_broken_teacher_files_give_one_clear_line(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", tmp_path / "o", *SMALL) == 2
    assert "could not load the checkpoint" in _error_of(capsys)
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    assert _run("--teacher", gguf, "--data", corpus, "--target-size", "0.7x", "--out", tmp_path / "p", *SMALL) == 2
    assert "could not read GGUF file" in _error_of(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_quantize_stage_writes_checked_graphs_and_inspect_judges_them(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    out = tmp_path / "quantized"
    args = ["--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL,
            "--stop-after", "quantize", "--distill-tokens", "256", "--distill-seq-len", "16", "--distill-batch-size", "4",
            "--seq-len", "16", "--quant-calib-samples", "4"]
    assert _run(*args, "--quant", "a8w8", "--npu-profile", "generic-a8w8") == 0
    assert "model.a8w8.onnx" in capsys.readouterr().out
    for name in ("model.onnx", "decode.onnx", "model.a8w8.onnx", "decode.a8w8.onnx"):
        assert (out / "onnx" / name).exists(), name
    exported = json.loads((out / "export.metrics.json").read_text())
    assert exported["source"].endswith("student") and exported["max_abs_diff_vs_torch"] <= 1e-4
    metrics = json.loads((out / "quantize.metrics.json").read_text())
    assert metrics["violations"] == [] and 0 < metrics["a8w8"]["agreement"] <= 1
    assert metrics["a8w8"]["prefill_mb"] < exported["fp32"]["prefill_mb"]  # tiny: scales and zero points weigh a lot

    assert _run("inspect", out / "onnx" / "model.a8w8.onnx", "--npu-profile", "generic-a8w8") == 0
    assert "passes" in capsys.readouterr().out
    assert _run("inspect", out / "onnx" / "model.onnx", "--npu-profile", "generic-a8w8") == 1  # float graph
    assert "float-island" in capsys.readouterr().out
    assert _run("inspect", out / "onnx" / "model.onnx", "--float") == 0
    assert _run("inspect", tmp_path / "missing.onnx") == 2
    assert "no such file" in capsys.readouterr().err

    # Another recipe with the same float rewrites re-runs only the quantize stage; another profile also
    # re-exports (QNN: linears as Convs), as do other rewrites (each recipe has its own default).
    assert _run(*args, "--quant", "a16w8", "--npu-profile", "generic-a8w8", "--quant-transforms", "rotate,embed-rows") == 0
    assert capsys.readouterr().out.count("reused") == 5  # score, plan, prune, distill, export
    assert (out / "onnx" / "model.a16w8.onnx").exists()
    assert _run(*args, "--quant", "a16w8", "--npu-profile", "qnn-htp") == 0
    assert capsys.readouterr().out.count("reused") == 4
    assert any(n.op_type == "Conv" for n in onnx.load(out / "onnx" / "model.a16w8.onnx").graph.node)
    assert not (out / "onnx" / "model.a8w8.onnx").exists()  # graphs of other settings are not left behind
    metrics = json.loads((out / "quantize.metrics.json").read_text())
    # The tiny student was pruned with --align 16: QNN's multiples of 32 are reported, nothing else.
    assert metrics["violations"] and all(v.startswith("alignment") for v in metrics["violations"])
    from quant import qnn

    if qnn.unavailable() is not None:
        assert metrics["htp"] == {"skipped": qnn.unavailable()}
        return
    # Qualcomm's HTP compiler took both graphs whole: the compiled models, their op traces, and the emulator's
    # perplexity on the same sequences as ONNX Runtime's CPU.
    htp = metrics["htp"]
    assert htp["soc_model"] == "60" and set(htp["graphs"]) == {"prefill", "decode"}
    for stem in ("model.a16w8", "decode.a16w8"):
        for suffix in (".qnn.onnx", ".qnn_qnn.bin", ".qnn_op_trace.json"):
            assert (out / "onnx" / f"{stem}{suffix}").exists(), stem + suffix
    assert all(g["whole"] and not g["unsupported"] for g in htp["graphs"].values())
    emulated = htp["emulated"]
    assert emulated["sequences"] == 4 and emulated["perplexity"] == pytest.approx(emulated["cpu_perplexity"], rel=0.05)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert _run("report", out, "--quiet") == 0
    markdown = (out / "report.md").read_text()
    assert "## On the NPU: Qualcomm's HTP compiler" in markdown and "`onnx/model.a16w8.qnn.onnx`" in markdown


def test_w4a16_writes_lpbq_int4_graphs_the_htp_compiler_takes_whole(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    out = tmp_path / "w4"
    args = ["--teacher", teacher, "--data", corpus, "--out", out, *SMALL, "--stop-after", "quantize", "--seq-len", "16",
            "--quant", "w4a16", "--quant-calib-samples", "2", "--quant-decode-calib-tokens", "16"]
    # Blocks of 32 inputs: a student pruned to multiples of 16 is refused before anything runs.
    assert _run(*args, "--target-size", "0.7x") == 2 and "use --align 64" in _error_of(capsys)
    assert _run(*args, "--target-size", "0.7x", "--student", "mu") == 2 and "--quant w4a16" in _error_of(capsys)
    assert not out.exists()
    assert _run(*args, "--target-size", "1x") == 0  # the teacher itself: widths 64 and 128
    metrics = json.loads((out / "quantize.metrics.json").read_text())
    assert metrics["violations"] == []
    assert metrics["reports"]["prefill"]["block_weights"] == metrics["reports"]["decode"]["block_weights"] == 7 * 3
    graph = onnx.load(out / "onnx" / "decode.w4a16.onnx").graph
    assert sum(any(a.name == "block_size" for a in n.attribute) for n in graph.node) == 7 * 3
    from quant import qnn

    if qnn.unavailable() is None:
        assert all(g["whole"] for g in metrics["htp"]["graphs"].values())
    # Quantization-aware training reruns the quantize stage alone, on training tokens, and says what it did.
    capsys.readouterr()
    assert _run(*args, "--target-size", "1x", "--quant-qat-tokens", "64") == 0
    assert capsys.readouterr().out.count("reused") == 5  # score, plan, prune, distill, export
    trained = json.loads((out / "quantize.metrics.json").read_text())
    assert trained["qat"]["tokens"] == 64 and trained["qat"]["steps"] == 1
    assert trained["reports"]["prefill"]["block_weights"] == 7 * 3 and trained["violations"] == []
    assert _run("report", out, "--quiet") == 0
    assert "64 training tokens" in (out / "report.md").read_text()
    assert _run(*args[:-6], "--quant", "a16w8", "--target-size", "1x", "--quant-qat-tokens", "64") == 2
    assert "--quant-qat-tokens trains int4 LPBQ block weights" in _error_of(capsys)


def test_the_cpu_profile_writes_weight_only_graphs_that_track_the_float_ones(inputs, tmp_path, capsys):
    from quant import runtime

    teacher, corpus = inputs
    out = tmp_path / "cpu"
    args = ["--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL, "--stop-after", "quantize",
            "--distill-tokens", "256", "--distill-seq-len", "16", "--distill-batch-size", "4", "--seq-len", "16",
            "--npu-profile", "ort-cpu"]
    # A Q/DQ recipe on the CPU profile (or a weight-only one on an NPU's) is refused before anything runs.
    assert _run(*args, "--quant", "a16w8") == 2 and "does not fit --npu-profile ort-cpu" in _error_of(capsys)
    assert _run(*args[:-2], "--quant", "w8") == 2 and "does not fit --npu-profile qnn-htp" in _error_of(capsys)
    assert _run(*args, "--quant", "w8", "--student", "mu") == 2 and "--student mu has no graphs" in _error_of(capsys)
    assert not out.exists()  # refused before any stage wrote anything
    assert _run(*args, "--quant", "w8") == 0
    metrics = json.loads((out / "quantize.metrics.json").read_text())
    assert metrics["violations"] == [] and metrics["htp"] == {}
    graph = onnx.load(out / "onnx" / "model.w8.onnx").graph
    kinds = {n.op_type for n in graph.node}
    assert "MatMulNBits" in kinds and "QuantizeLinear" not in kinds
    # Every linear layer and the head (its own weights now, the table stays the lookup's) are int8 blocks.
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 7 * 3 + 1
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in
                {t.name for t in graph.initializer}]
    ids = np.random.default_rng(0).integers(3, 200, (2, 16))
    float_logits = runtime.prefill_logits(runtime.session(out / "onnx" / "model.onnx"), ids)
    int_logits = runtime.prefill_logits(runtime.session(out / "onnx" / "model.w8.onnx"), ids)
    assert np.sqrt(((int_logits - float_logits) ** 2).mean()) / float_logits.std() < 0.05
    assert metrics["w8"]["decode_tokens_per_second"] > 0 and metrics["w8"]["perplexity"] == pytest.approx(
        json.loads((out / "export.metrics.json").read_text())["fp32"]["perplexity"], rel=0.05)


def test_target_1x_exports_the_teacher_without_distilling(inputs, tmp_path, capsys):
    teacher, corpus = inputs
    out = tmp_path / "teacher-graphs"
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "1x", "--out", out, *SMALL,
                "--stop-after", "export", "--seq-len", "16", "--quant-calib-samples", "2") == 0
    assert "the student is the teacher" in capsys.readouterr().out
    assert not (out / "student").exists()
    exported = json.loads((out / "export.metrics.json").read_text())
    assert exported["source"].endswith("pruned") and exported["max_abs_diff_vs_torch"] <= 1e-4


WHOLE = ["--distill-tokens", "512", "--distill-seq-len", "16", "--distill-batch-size", "4", "--distill-eval-every", "4",
         "--seq-len", "16", "--quant-calib-samples", "4", "--npu-profile", "generic-a8w8", "--stop-after", "report"]


def test_whole_run_ends_in_a_report_whose_numbers_re_measure(inputs, tmp_path, capsys):
    from compress import load_corpus, load_teacher, quality, token_batches
    from quant import runtime

    teacher, corpus = inputs
    out = tmp_path / "whole"
    args = ["--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL, *WHOLE]
    assert _run(*args) == 0
    summary = capsys.readouterr().out
    assert "report.md" in summary
    for name in ("config.json", "run.log", "stages.json", "scores.safetensors", "plan.json", "pruned/model.safetensors",
                 "student/model.safetensors", "onnx/model.onnx", "onnx/decode.onnx", "onnx/model.a16w8.onnx",
                 "onnx/decode.a16w8.onnx", "report.json", "report.md"):
        assert (out / name).exists(), name
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert "stage distill" in (out / "run.log").read_text()

    report = json.loads((out / "report.json").read_text())
    assert sorted(report["files"]["plots"]) == ["report_distill.png", "report_latency.png", "report_models.png",
                                               "report_planner.png"]
    assert all((out / p).stat().st_size > 10_000 for p in report["files"]["plots"])
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "pruned", "distilled", "fp32 graph", "a16w8 graph (generic-a8w8)"]
    assert report["verdict"] and report["data"]["validation_tokens"] == 4 * 15
    markdown = (out / "report.md").read_text()
    assert "## Verdict" in markdown and "report_models.png" in markdown

    # Re-measure the artifacts independently: the report holds exactly what they give.
    model, tokenizer = load_teacher(str(teacher))
    ids = token_batches(load_corpus(str(corpus)), tokenizer, "validation", 16, 4)
    measured_teacher = quality(model, ids, 4)
    assert rows["teacher"]["perplexity"] == pytest.approx(measured_teacher.perplexity.perplexity, rel=1e-6)
    for name, folder in (("pruned", "pruned"), ("distilled", "student")):
        student = AutoModelForCausalLM.from_pretrained(out / folder, dtype=torch.float32)
        again = quality(student, ids, 4, reference=measured_teacher.top1)
        assert rows[name]["perplexity"] == pytest.approx(again.perplexity.perplexity, rel=1e-5), name
        assert rows[name]["agreement"] == pytest.approx(again.agreement), name
        assert rows[name]["params"] == sum(p.numel() for p in student.parameters())
    for name, graph in (("fp32 graph", "model.onnx"), ("a16w8 graph (generic-a8w8)", "model.a16w8.onnx")):
        path = out / "onnx" / graph
        assert rows[name]["mb"] == path.stat().st_size / 1e6
        again, top1 = runtime.quality(runtime.session(path), ids.numpy(), measured_teacher.top1.numpy())
        assert rows[name]["perplexity"] == pytest.approx(again.perplexity, rel=1e-5), name
        assert rows[name]["agreement"] == pytest.approx(again.agreement), name

    # A finished run reruns in seconds, reusing everything; `compress report` rebuilds the report alone.
    assert _run(*args) == 0
    assert capsys.readouterr().out.count("reused") == 7  # every stage but correct, which is off
    (out / "report.md").unlink()
    assert _run("report", out, "--quiet") == 0 and (out / "report.md").exists()
    assert _run("report", tmp_path) == 2
    assert "no config.json" in capsys.readouterr().err


def test_interrupted_runs_resume_without_redoing_finished_stages(inputs, tmp_path):
    teacher, corpus = inputs
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "compress.app.cli", "--teacher", str(teacher), "--data", str(corpus), "--target-size",
               "0.7x", "--out", str(out), *SMALL, *WHOLE, "--distill-tokens", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def interrupt_when(line, signum):
        # A test runner started in the background inherits an ignored SIGINT; Python keeps it ignored. Restore it.
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        log = out / "run.log"
        deadline = time.time() + 300
        # Wait for the line and a distillation checkpoint newer than the last one seen: the distillation is then
        # under way (100k tokens of the tiny model last well over ten seconds more).
        while time.time() < deadline and process.poll() is None:
            steps = sorted(out.glob("checkpoints/*/step-*/state.json"))
            if (log.exists() and log.read_text().count(line) == seen.get(line, 0) + 1 and steps
                    and steps[-1] != seen.get("checkpoint")):
                break
            time.sleep(0.02)
        process.send_signal(signum)
        seen["checkpoint"] = sorted(out.glob("checkpoints/*/step-*/state.json"))[-1]
        stdout, stderr = process.communicate(timeout=120)
        seen[line] = log.read_text().count(line)
        return process.returncode, stderr

    seen: dict[str, int] = {}
    code, stderr = interrupt_when("stage distill\n", signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["correct", "score", "plan", "prune"]
    code, stderr = interrupt_when("resuming distillation", signal.SIGINT)  # the rerun resumes, and is interrupted
    assert code == 130 and "rerun the same command" in stderr, (code, stderr[-2000:], (out / "run.log").read_text()[-3000:])
    assert json.loads((out / "stages.json").read_text()) == stages
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reused = [line.split()[0] for line in done.stdout.splitlines() if " reused " in line]
    assert reused == ["score", "plan", "prune"]
    assert json.loads((out / "distill.metrics.json").read_text())["resumed_from_step"] > 0
    assert (out / "report.json").exists() and not [p for p in out.rglob(".*")]


def test_config_file_in_yaml_or_json_and_flags_override_it(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("teacher: smollm2-135m\ntarget_size: 50%\ndistill_tokens: 1000\naxes: [heads, mlp]\n")
    assert _run("--config", tmp_path / "run.yaml", "--distill-tokens", "2000", "--print-config") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["target_size"], shown["distill"]["tokens"], shown["prune"]["axes"]) == ("50%", 2000, ["heads", "mlp"])
    (tmp_path / "nested.yaml").write_text("target_size: 50%\ndistill:\n  tokens: 2000\nprune:\n  axes: [heads, mlp]\n")
    assert _run("--config", tmp_path / "nested.yaml", "--print-config") == 0
    assert json.loads(capsys.readouterr().out) == shown
    (tmp_path / "run.json").write_text(json.dumps(shown))
    assert _run("--config", tmp_path / "run.json", "--print-config") == 0
    assert json.loads(capsys.readouterr().out) == shown
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed\n")
    assert _run("--config", tmp_path / "bad.yaml") == 2
    assert "cannot read it as YAML" in _error_of(capsys)
    (tmp_path / "list.yml").write_text("- a\n- b\n")
    assert _run("--config", tmp_path / "list.yml") == 2
    assert "field: value pairs" in _error_of(capsys)


def test_a_changed_recipe_default_or_stage_code_reruns_that_stage_and_the_ones_after(inputs, tmp_path, capsys,
                                                                                      monkeypatch):
    import dataclasses

    from compress.app import pipeline
    from quant.quantize import PRESETS

    teacher, corpus = inputs
    args = ["--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", tmp_path / "run", *SMALL,
            "--distill-tokens", "128", "--distill-seq-len", "16", "--distill-batch-size", "4", "--seq-len", "16",
            "--quant-calib-samples", "2", "--quant-decode-calib-tokens", "8", "--npu-profile", "generic-a8w8",
            "--stop-after", "quantize"]
    assert _run(*args) == 0

    def stages(summary):
        return {line.split()[0]: line.split()[1] for line in summary.splitlines()[1:]}

    assert set(stages(capsys.readouterr().out).values()) != {"reused"}
    assert _run(*args) == 0
    assert set(stages(capsys.readouterr().out).values()) == {"reused"}
    recipe = PRESETS["a16w8"]
    monkeypatch.setitem(PRESETS, "a16w8", dataclasses.replace(recipe, weight_rounding="nearest"))
    assert _run(*args) == 0
    after = stages(capsys.readouterr().out)
    assert after["export"] == "reused" and after["quantize"] != "reused"

    versions = pipeline.code_version
    monkeypatch.setattr(pipeline, "code_version", lambda stage: versions(stage) + ("x" if stage == "distill" else ""))
    assert _run(*args) == 0
    after = stages(capsys.readouterr().out)
    assert after["prune"] == "reused" and all(after[s] != "reused" for s in ("distill", "export", "quantize"))


def test_a_student_that_training_makes_worse_keeps_its_initial_weights(inputs, tmp_path):
    teacher, corpus = inputs
    out = tmp_path / "run"
    flags = ("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", *SMALL, "--distill-tokens", "256",
             "--distill-seq-len", "16", "--distill-batch-size", "4", "--distill-lr", "1", "--seq-len", "16",
             "--quant-calib-samples", "2", "--quant", "none", "--stop-after", "report")
    # A learning rate of 1 wrecks any student within a few steps: the guard backs it off (to 0.1 at least), and
    # with the guard off the stage must ship the pruned weights instead.
    assert _run(*flags, "--out", tmp_path / "guarded") == 0
    guarded = json.loads((tmp_path / "guarded" / "distill.metrics.json").read_text())
    assert guarded["lr_backoffs"][0]["to"] == pytest.approx(0.1) and guarded["peak_lr"] <= 0.1 + 1e-12
    assert "went back to its initial weights" in (tmp_path / "guarded" / "report.md").read_text()
    assert _run(*flags, "--out", out, "--distill-lr-backoffs", "0") == 0
    metrics = json.loads((out / "distill.metrics.json").read_text())
    assert metrics["kept_initial"]["trained"]["validation"] > metrics["student_perplexity_before"]
    assert metrics["student_perplexity"] == metrics["student_perplexity_before"]
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned").state_dict()
    student = AutoModelForCausalLM.from_pretrained(out / "student").state_dict()
    assert all(torch.equal(pruned[k], student[k]) for k in pruned)
    assert "keeps its initial weights" in (out / "report.md").read_text()
