"""Distillation across processes: a SIGKILLed run resumes to the same weights; torchrun (gloo) matches one process."""

import os
import signal
import subprocess
import sys
import time

from factories import tiny_tokenizer, write_corpus
from safetensors.torch import load_file
from test_distill import _pair

CLI = [sys.executable, "-m", "compress.cli", "distill"]


def _inputs(tmp_path):
    teacher, student = _pair()
    tokenizer = tiny_tokenizer()
    for model, name in ((teacher, "teacher"), (student, "student")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / "teacher", tmp_path / "student", write_corpus(tmp_path, 200)


def _args(teacher, student, corpus, out, *extra):
    return [*CLI, "--teacher", str(teacher), "--student", str(student), "--data", str(corpus), "--out", str(out),
            "--distill-seq-len", "16", "--eval-samples", "2", "--eval-seq-len", "16", "--quiet", *extra]


def _env(tmp_path):
    return {**os.environ, "PDQ_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_sigkill_mid_run_then_rerun_gives_the_same_weights(tmp_path):
    teacher, student, corpus = _inputs(tmp_path)
    env = _env(tmp_path)
    common = ["--distill-tokens", "19200", "--distill-batch-size", "4", "--distill-eval-every", "25", "--no-bf16"]
    subprocess.run(_args(teacher, student, corpus, tmp_path / "straight", *common), env=env, check=True,
                   capture_output=True)

    out = tmp_path / "killed"
    checkpoints = tmp_path / "killed.checkpoints"
    process = subprocess.Popen(_args(teacher, student, corpus, out, *common), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("step-*/state.json")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "the run finished before it could be killed: raise the budget"
    done = sorted(p.name for p in checkpoints.glob("step-*") if (p / "state.json").exists())
    assert done and done[-1] < "step-0000300"

    resumed = subprocess.run(_args(teacher, student, corpus, out, *common), env=env, check=True,
                             capture_output=True, text=True)
    assert '"resumed_from_step": 0' not in resumed.stdout
    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    teacher, student, corpus = _inputs(tmp_path)
    env = _env(tmp_path)
    common = ["--distill-tokens", "1280", "--distill-eval-every", "0", "--no-bf16"]
    subprocess.run(_args(teacher, student, corpus, tmp_path / "one", *common, "--distill-batch-size", "8"),
                   env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "compress.cli"]
    # 2 processes x 4 sequences, and 2 processes x 2 micro-batches of 2 (exercises DDP's no_sync accumulation)
    for name, batch in (("two", ["--distill-batch-size", "4"]), ("two-accum", ["--distill-batch-size", "2", "--distill-grad-accum", "2"])):
        two = _args(teacher, student, corpus, tmp_path / name, *common, *batch)
        result = subprocess.run([*torchrun, *two[3:]], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    a = _weights(tmp_path / "one")
    for name in ("two", "two-accum"):
        b = _weights(tmp_path / name)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4, name
    moved = max(float((a[k] - load_file(str(tmp_path / "student" / "model.safetensors"))[k]).abs().max()) for k in a)
    assert moved > 1e-3  # training actually changed the weights
