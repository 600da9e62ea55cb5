"""Run the benchmarks whose results are missing, then rebuild ``benchmarks/results/README.md`` from every
result present.

    python -m benchmarks             # make-style: only what is missing (delete a result to redo it)
    python -m benchmarks --all       # every benchmark (about four hours on a 2-core CPU)
    python -m benchmarks --readme    # only rebuild the README from the results present
    python -m benchmarks --list      # what would run, and why

Benchmarks run one after another in their own processes (never two at once: they time things).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from compress.io import write_text

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ROOT = HERE.parent
# same_numbers stops after distillation: graphs of the deep-thin students take too long on 2 cores for two commits.
SAME_ARGS = ("--target-size 60M --calib-samples 16 --proxy mass --eval-samples 8 --eval-seq-len 64 --distill-tokens 4096 "
             "--distill-seq-len 64 --distill-eval-every 4 --no-bf16 --stop-after distill")
PRUNED_RUN = ROOT / "runs" / "benchmarks-0.67x"  # the 0.67x pruned student the student quantization row uses
# Distilled 0.67x students the quantization targets read: the one `compress --teacher smollm2-135m --target-size
# 0.67x` leaves in its default run directory, and the one the AVX2 main-command target below leaves (run it first).
STUDENT = ROOT / "runs" / "smollm2-135m-0.67x" / "student"
EPYC_STUDENT = ROOT / "runs" / "main_command_smollm2-135m-epyc" / "student"


@dataclass(frozen=True)
class Target:
    """One benchmark invocation and the result files it writes."""

    module: str
    outputs: tuple[str, ...]
    args: tuple[str, ...] = ()
    needs_pruned_run: bool = False
    title: str = ""
    extra: tuple[str, ...] = ()  # more result files shown in the README

    def stale(self) -> str | None:
        """Why this target must run, or None when its results are all there.

        File times say nothing after a git clone, so a changed benchmark is rerun by deleting its results
        (or with --all).
        """
        missing = [n for n in self.outputs if not (RESULTS / n).exists()]
        return f"{', '.join(missing)} missing" if missing else None


TARGETS = (
    Target("main_command", ("main_command.json", "main_command.md"), title="The README's main command, one run"),
    # The same command on a machine without native bf16 (AVX2, no AVX-512 BF16 or AMX: training in fp32).
    Target("main_command", ("main_command_smollm2-135m-epyc.json", "main_command_smollm2-135m-epyc.md"),
           args=("--name", "main_command_smollm2-135m-epyc"),
           title="The README's main command on an AVX2 machine without native bf16, one run"),
    Target("main_command", ("main_command_gemma3-270m.json", "main_command_gemma3-270m.md"),
           args=("--teacher", "gemma3-270m", "--no-setup", "--flags", "--distill-tokens 20000 --no-bf16"),
           title="The main command on gemma3-270m (--axes auto: the vocabulary trimmed), one run"),
    Target("main_command", ("main_command_gemma3-270m-calib32.json", "main_command_gemma3-270m-calib32.md"),
           args=("--teacher", "gemma3-270m", "--no-setup", "--name", "main_command_gemma3-270m-calib32", "--flags",
                 "--distill-tokens 20000 --no-bf16 --quant-calib-samples 32"),
           title="The main command on gemma3-270m with 32 quantization calibration sequences, one run"),
    Target("main_command", ("main_command_gemma3-270m-blocks.json", "main_command_gemma3-270m-blocks.md"),
           args=("--teacher", "gemma3-270m", "--no-setup", "--name", "main_command_gemma3-270m-blocks",
                 "--flags", "--axes heads,hidden,mlp --distill-tokens 20000 --no-bf16"),
           title="The main command on gemma3-270m with blocks only (the whole vocabulary kept), one run"),
    Target("same_numbers", ("same_numbers.json", "same_numbers.md"), args=("--base", "36307ec", "--args", SAME_ARGS),
           title="Every student family at the commit before the package redesign and after it"),
    Target("pruning_quality", ("pruning_quality.json", "pruning_quality.md"), title="Pruning quality without retraining"),
    Target("pruning_quality", ("pruning_quality_gemma3-270m.json", "pruning_quality_gemma3-270m.md"),
           args=("--teacher", "gemma3-270m", "--vocab", "--no-bf16"),
           title="Pruning quality without retraining on gemma3-270m, with and without vocabulary trimming"),
    Target("distill_recovery", ("distill_recovery.json", "distill_recovery.md"),
           title="Distillation recipes judged on general English", extra=("distill_recovery_2026-11-22.md",)),
    Target("distill_recovery", ("distill_recovery_2.json", "distill_recovery_2.md"),
           args=("--arms", "kd-3e-5,kd-1e-3,ce-3e-4,mix-3e-4", "--name", "distill_recovery_2"),
           title="Distillation recipes judged on general English, second run"),
    Target("distill_recovery", ("distill_recovery_3.json", "distill_recovery_3.md"),
           args=("--arms", "mix-t2-3e-4,mix-cosine-3e-4,mix-hidden-3e-4,mix-corrected-3e-4", "--name", "distill_recovery_3"),
           title="Distillation recipes around the default (KD + cross-entropy)"),
    Target("distill_recovery", ("distill_topk.json", "distill_topk.md"),
           args=("--arms", "mix-3e-4,mix-topk64-3e-4", "--name", "distill_topk"),
           title="Stored top-64 teacher logits against the full-vocabulary KL"),
    Target("distill_recovery", ("distill_recovery_gemma3-270m-vocab.json", "distill_recovery_gemma3-270m-vocab.md"),
           args=("--teacher", "gemma3-270m", "--vocab", "--no-bf16", "--tokens", "20480", "--eval-every", "5", "--arms", "mix-3e-5,mix-1e-5",
                 "--name", "distill_recovery_gemma3-270m-vocab"),
           title="Distillation on gemma3-270m pruned to 0.67x with the vocabulary trimmed"),
    Target("distill_recovery", ("distill_recovery_gemma3-270m.json", "distill_recovery_gemma3-270m.md"),
           args=("--teacher", "gemma3-270m", "--no-bf16", "--tokens", "20480", "--eval-every", "5", "--arms", "mix-3e-4,mix-3e-5",
                 "--name", "distill_recovery_gemma3-270m"),
           title="Distillation on gemma3-270m pruned to 0.67x in its blocks only (the whole vocabulary kept)"),
    Target("distill_overhead", ("distill_overhead.json", "distill_overhead.md"),
           title="Distillation step time against the bare loop and the matmul ceiling"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m.json", "quant_accuracy_smollm2-135m.md"),
           title="Quantization accuracy: the teacher"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-cpu.json", "quant_accuracy_smollm2-135m-cpu.md"),
           args=("--rows", "final", "--final", "w8,w4", "--name", "smollm2-135m-cpu"),
           title="Quantization accuracy: the teacher, CPU profile (weight-only)"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-pruned.json", "quant_accuracy_smollm2-135m-0.67x-pruned.md"),
           args=("--model", str(PRUNED_RUN / "pruned"), "--name", "smollm2-135m-0.67x-pruned"), needs_pruned_run=True,
           title="Quantization accuracy: the 0.67x pruned student"),
    # The main command's distilled student (the first target leaves it in runs/smollm2-135m-0.67x).
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student.json", "quant_accuracy_smollm2-135m-0.67x-student.md"),
           args=("--model", str(STUDENT), "--rows", "final", "--final",
                 "a16w8", "--htp-seqs", "1", "--name", "smollm2-135m-0.67x-student"),
           title="Quantization accuracy: the distilled 0.67x student, A16W8 (qnn-htp)"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-a8w8.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-a8w8.md"),
           args=("--model", str(STUDENT), "--rows", "final", "--final",
                 "a8w8,a8w8-qnn-htp", "--htp-seqs", "2", "--name", "smollm2-135m-0.67x-student-a8w8"),
           title="Quantization accuracy: the distilled 0.67x student, A8W8 on both NPU profiles"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-cpu.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-cpu.md"),
           args=("--model", str(STUDENT), "--rows", "final", "--final", "w8,w4",
                 "--name", "smollm2-135m-0.67x-student-cpu"),
           title="Quantization accuracy: the distilled 0.67x student, CPU profile (weight-only)"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-w4a16.json", "quant_accuracy_smollm2-135m-w4a16.md"),
           args=("--rows", "final", "--final", "w4a16", "--htp-seqs", "2", "--name", "smollm2-135m-w4a16"),
           title="Quantization accuracy: the teacher, W4A16 (qnn-htp, LPBQ int4 blocks), GPTQ Hessians from 8 sequences"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-w4a16.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-w4a16.md"),
           args=("--model", str(STUDENT), "--rows", "final", "--final", "w4a16",
                 "--htp-seqs", "2", "--name", "smollm2-135m-0.67x-student-w4a16"),
           title="Quantization accuracy: the distilled 0.67x student, W4A16 (qnn-htp, LPBQ int4 blocks), GPTQ Hessians "
           "from 8 sequences"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-w4a16-qat.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-w4a16-qat.md"),
           args=("--model", str(STUDENT), "--rows", "final", "--final",
                 "w4a16-qat", "--qat-tokens", "524288", "--htp-seqs", "2", "--name", "smollm2-135m-0.67x-student-w4a16-qat"),
           title="Quantization accuracy: the distilled 0.67x student, W4A16 after quantization-aware training"),
    # The same W4A16 graphs after GPTQ took its Hessians from 32 sequences and LPBQ block steps their nearest
    # multiple (commit bc99b16); the two targets above measured the code before.
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-w4a16-gptq32.json", "quant_accuracy_smollm2-135m-w4a16-gptq32.md"),
           args=("--rows", "final", "--final", "w4a16", "--htp-seqs", "2", "--name", "smollm2-135m-w4a16-gptq32"),
           title="Quantization accuracy: the teacher, W4A16, GPTQ Hessians from 32 sequences"),
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-w4a16-gptq32.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-w4a16-gptq32.md"),
           args=("--model", str(STUDENT), "--rows", "final", "--final", "w4a16",
                 "--htp-seqs", "2", "--name", "smollm2-135m-0.67x-student-w4a16-gptq32"),
           title="Quantization accuracy: the distilled 0.67x student, W4A16, GPTQ Hessians from 32 sequences"),
    # QAT from that GPTQ with the LPBQ channel units trained too (commit cb781f9), the table frozen; one int4 table
    # (measured before the split table, commit 7c9e8d1, existed).
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-w4a16-qat-units.json",
                              "quant_accuracy_smollm2-135m-w4a16-qat-units.md"),
           args=("--rows", "final", "--final", "w4a16-qat", "--qat-tokens", "262144", "--qat-table-lr", "0",
                 "--table-int8-rows", "0", "--htp-seqs", "2", "--name", "smollm2-135m-w4a16-qat-units"),
           title="Quantization accuracy: the teacher, W4A16 after quantization-aware training of the weights and "
           "their LPBQ units, one int4 table"),
    # The same with w4a16's split table: the 8,192 most frequent tokens' rows int8 (commit 7c9e8d1).
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-w4a16-split.json",
                              "quant_accuracy_smollm2-135m-w4a16-split.md"),
           args=("--rows", "final", "--final", "w4a16-qat", "--qat-tokens", "262144", "--htp-seqs", "2",
                 "--name", "smollm2-135m-w4a16-split"),
           title="Quantization accuracy: the teacher, W4A16 after quantization-aware training, the table's 8,192 most "
           "frequent tokens' rows in int8"),
    # EPYC_STUDENT: GPTQ's w4a16 with the split table and with one int4 table, in the same run.
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-w4a16-split-gptq.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-w4a16-split-gptq.md"),
           args=("--model", str(EPYC_STUDENT), "--rows", "final",
                 "--final", "w4a16,w4a16-int4-table", "--htp-seqs", "2",
                 "--name", "smollm2-135m-0.67x-student-w4a16-split-gptq"),
           title="Quantization accuracy: the distilled 0.67x student, W4A16 from GPTQ, the split table against one "
           "int4 table"),
    # The same student and split table after quantization-aware training, the LPBQ units fixed (at the default unit
    # rate the training's KL rose; the results file's note).
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-w4a16-split-qat.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-w4a16-split-qat.md"),
           args=("--model", str(EPYC_STUDENT), "--rows", "final",
                 "--final", "w4a16-qat", "--qat-tokens", "262144", "--qat-unit-lr", "0", "--htp-seqs", "2",
                 "--name", "smollm2-135m-0.67x-student-w4a16-split-qat"),
           title="Quantization accuracy: the distilled 0.67x student, W4A16 with the split table after "
           "quantization-aware training (units fixed)"),
    # W4A8: the same int4 weights and split table under A8W8's 8-bit activations (a benchmark graph, not a preset).
    Target("quant_accuracy", ("quant_accuracy_smollm2-135m-0.67x-student-w4a8.json",
                              "quant_accuracy_smollm2-135m-0.67x-student-w4a8.md"),
           args=("--model", str(EPYC_STUDENT), "--rows", "final", "--final", "w4a8", "--htp-seqs", "2",
                 "--name", "smollm2-135m-0.67x-student-w4a8"),
           title="Quantization accuracy: the distilled 0.67x student, W4A8 (W4A16's int4 weights, A8W8's activations)"),
    Target("w4_layers", ("w4_layers_smollm2-135m-0.67x-student.json", "w4_layers_smollm2-135m-0.67x-student.md"),
           args=("--model", str(EPYC_STUDENT), "--name", "smollm2-135m-0.67x-student"),
           title="Where W4A16's int4 block weights lose accuracy: the distilled 0.67x student, layer by layer"),
    Target("w4_layers", ("w4_layers_smollm2-135m-owq.json", "w4_layers_smollm2-135m-owq.md"),
           args=("--model", "smollm2-135m", "--rows", "owq", "--name", "smollm2-135m-owq"),
           title="W4A16's int4 block weights with a few input columns kept float (OWQ): the teacher"),
    Target("w4_layers", ("w4_layers_smollm2-135m-recon.json", "w4_layers_smollm2-135m-recon.md"),
           args=("--model", "smollm2-135m", "--rows", "recon", "--name", "smollm2-135m-recon"),
           title="W4A16's int4 block weights trained block by block to the float blocks' outputs: the teacher"),
    Target("quant_accuracy", ("quant_accuracy_gemma3-270m.json", "quant_accuracy_gemma3-270m.md"),
           args=("--model", "gemma3-270m", "--rows", "3,4,final", "--final", "a16w8,a8w8-qnn-htp", "--htp-seqs", "1"),
           title="Quantization accuracy: the gemma3-270m teacher (per-row embedding scales, final graphs)"),
    # The distilled student the calib32 main-command target above leaves in runs/ (run that target first).
    Target("quant_sensitivity", ("quant_sensitivity_gemma3-270m-student.json", "quant_sensitivity_gemma3-270m-student.md"),
           args=("--model", str(ROOT / "runs" / "main_command_gemma3-270m-calib32" / "student"),
                 "--name", "gemma3-270m-student", "--eval-seqs", "16", "--rows", "0,1,6"),
           title="Where A16W8 loses accuracy: the distilled gemma3-270m student, one tensor group at a time"),
    Target("weight_ranges", ("weight_ranges_smollm2-135m.json", "weight_ranges_smollm2-135m.md"),
           title="Int8 weight rounding: the teacher"),
    Target("weight_ranges", ("weight_ranges_smollm2-135m-0.67x-pruned.json", "weight_ranges_smollm2-135m-0.67x-pruned.md"),
           args=("--model", str(PRUNED_RUN / "pruned"), "--name", "smollm2-135m-0.67x-pruned"), needs_pruned_run=True,
           title="Int8 weight rounding: the 0.67x pruned student"),
    Target("weight_ranges", ("weight_ranges_smollm2-135m_int4.json", "weight_ranges_smollm2-135m_int4.md"),
           args=("--seeds", "0", "--bits", "4"),
           title="Int4 weight rounding: the teacher (per channel, LPBQ blocks, the table)"),
    # The runs it compiles are made by the commands in its docstring (the first by the main_command target).
    Target("htp_compile", ("htp_compile.json", "htp_compile.md"),
           args=(str(ROOT / "runs" / "smollm2-135m-0.67x"), str(ROOT / "runs" / "mu-htp"), str(ROOT / "runs" / "mobilellm-htp")),
           title="Qualcomm's HTP compiler on every student family's graphs"),
    Target("mu_init", ("mu_init.json", "mu_init.md"), title="Mu-like student: random vs teacher initialization"),
    Target("student_shapes", ("student_shapes.json", "student_shapes.md"),
           title="Student families at one budget: Minitron-like, MobileLLM-like, Mu-like"),
    # After student_shapes: it fine-tunes that benchmark's students.
    Target("task_finetune", ("task_finetune.json", "task_finetune.md"), title="Task fine-tuning with LoRA"),
    Target("pair_widths", ("pair_widths.json", "pair_widths.md"),
           title="Fine-tuning on pairs: batches at their own width against the set's width"),
    # Last: it distills and fine-tunes three students and the teacher (hours on 2 cores).
    Target("settings_agent", ("settings_agent.json", "settings_agent.md"),
           title="Settings agent: exact match and response time of every student family",
           extra=("settings_agent_mu1m.md", "settings_agent_mu_v2.md", "settings_agent_mu_v3.md",
                  "settings_agent_minitron_v3.md", "settings_agent_teacher_v3.md",
                  "settings_agent_mobilellm_v3.md")),
)


def _prune_run() -> None:
    """The pruned student the student quantization benchmark needs (reused when present)."""
    command = [sys.executable, "-m", "compress.app.cli", "--teacher", "smollm2-135m", "--target-size", "0.67x",
               "--out", str(PRUNED_RUN), "--stop-after", "prune", "--quiet"]
    subprocess.run(command, check=True, cwd=ROOT)


def readme() -> Path:
    """Write results/README.md: every benchmark's own markdown (headings one level down) and its plot."""
    lines = ["# Benchmark results", "",
             f"Rebuilt {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `python -m benchmarks` on {platform.machine()}, "
             f"{os.cpu_count()} CPUs. Each section is one benchmark's own report (its date and machine inside); "
             "the JSON files next to this one hold every number.", ""]
    for target in TARGETS:
        markdown = [RESULTS / n for n in (*target.outputs, *target.extra) if n.endswith(".md")]
        present = [p for p in markdown if p.exists()]
        rerun = f"`python -m benchmarks.{target.module} {' '.join(target.args)}`".replace(" `", "`")
        if not present:
            lines += [f"## {target.title}", "", f"Not run yet: {rerun}.", ""]
            continue
        made = [provenance_of(RESULTS / n) for n in target.outputs if n.endswith(".json") and (RESULTS / n).exists()]
        refused = [m for m in made if isinstance(m, str)]
        if refused:
            lines += [f"## {target.title}", "", f"Refused: {'; '.join(refused)}. Rerun {rerun}.", ""]
            continue
        for m in made:
            lines += [f"*{m['file']}: made by `{m['command']}` at commit `{m['commit']}`"
                      + (f" ({m['note']})" if m.get("note") else "") + ".*", ""]
        for path in present:
            body = path.read_text().strip().splitlines()
            lines += [("#" + line if line.startswith("#") else line) for line in body] + [""]
            plot = path.with_suffix(".png")
            if plot.exists() and plot.name not in path.read_text():
                lines += [f"![{plot.stem}]({plot.name})", ""]
    out = RESULTS / "README.md"
    write_text(out, "\n".join(lines))
    return out


def provenance_of(path: Path) -> dict[str, str] | str:
    """A results file's commit and command, or why it is refused (it records neither, or is not JSON)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"{path.name} is not readable JSON ({error})"
    if not isinstance(data, dict) or not data.get("commit") or not data.get("command"):
        return f"{path.name} records no commit and command, so no one can tell which code made its figures"
    return {"file": path.name, "commit": data["commit"], "command": data["command"], "note": data.get("provenance_note", "")}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="rerun every benchmark, up to date or not")
    parser.add_argument("--readme", action="store_true", help="only rebuild results/README.md")
    parser.add_argument("--list", action="store_true", help="print what would run and why, run nothing")
    args = parser.parse_args()
    if not args.readme:
        todo = [(t, "--all" if args.all else t.stale()) for t in TARGETS]
        todo = [(t, why) for t, why in todo if why]
        for target, why in todo:
            print(f"{'would run' if args.list else 'running'} benchmarks.{target.module} {' '.join(target.args)}  ({why})",
                  flush=True)
            if args.list:
                continue
            if target.needs_pruned_run:
                _prune_run()
            subprocess.run([sys.executable, "-m", f"benchmarks.{target.module}", *target.args], check=True, cwd=ROOT)
        if not todo:
            print("every benchmark is up to date (--all reruns them)")
        if args.list:
            return 0
    print(readme())
    return 0


if __name__ == "__main__":
    sys.exit(main())
