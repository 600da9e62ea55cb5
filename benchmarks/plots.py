"""Plot pieces every benchmark figure shares, the provenance every result records, and the model and text the
quantization benchmarks read."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def finish_perplexity_plot(fig: Any, ax: Any, teacher_perplexity: float, title: str, path: Path) -> None:
    """Teacher reference line, log-scale perplexity axis, legend and title; save as PNG and close."""
    import matplotlib.pyplot as plt

    ax.axhline(teacher_perplexity, color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher_perplexity:.1f})")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def provenance() -> dict[str, str]:
    """The commit (with ``+dirty`` when the tree had uncommitted changes) and the command that made a result, as
    they were when the benchmark started (this module is imported at its start): a long run must not record the
    commit the checkout moved to while it ran."""
    return dict(_STARTED)


def machine() -> str:
    """What a result's times were measured on: architecture, CPU model, threads, whether bf16 is native, torch.

    Sessions run on different machines (an Intel Xeon with AMX, an AVX2-only EPYC); their times, and how fast a
    training step runs, are comparable only on the same CPU."""
    import platform

    import torch

    from distill.speed import cpu_has_bf16

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_bf16() else "no native bf16"
    return f"{platform.machine()}, {model}{torch.get_num_threads()} threads, {bf16}, torch {torch.__version__}"


def model_parser(doc: str, stem: str, eval_seqs: int) -> Any:
    """The argument parser of a benchmark that measures one model on both :func:`evaluation_sets`, writing
    ``<stem>_<name>.{md,json}``: --model, --name, --seq-len, --eval-seqs, --calib-seqs, --out; the caller adds
    the rest."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="teacher alias or Hugging Face checkpoint directory")
    parser.add_argument("--name", required=True, help=f"results suffix: {stem}_<name>.{{md,json}}")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seqs", type=int, default=eval_seqs, help="sequences of each evaluation set")
    parser.add_argument("--calib-seqs", type=int, default=8, help="calibration sequences (compress's default: 8)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser


def load_model(parser: Any, model: str) -> tuple[Any, Any]:
    """The model (in eval mode) and tokenizer of ``model``, a teacher alias or a checkpoint directory; the parser's
    error when it names a directory that is not there."""
    from compress.sources.teachers import load_teacher

    if not Path(model).exists() and "/" in model:
        parser.error(f"--model {model}: no such directory; make the student first (e.g. the README's main command "
                     "with --stop-after distill writes RUN/student) or pass a teacher alias")
    loaded, tokenizer = load_teacher(model)
    return loaded.eval(), tokenizer


def write_results(out: Path, stem: str, report: dict, markdown: str) -> None:
    """``report`` as ``out/<stem>.json`` and ``markdown`` as ``out/<stem>.md`` (each written whole or not at all),
    and the markdown printed."""
    import json

    from compress.io import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    write_text(out / f"{stem}.md", markdown)
    print(markdown)


def evaluation_sets(tokenizer: Any, seq_len: int, sequences: int) -> dict[str, Any]:
    """The first ``sequences`` of the corpus's validation split and of general English held out of every training
    corpus, [n, seq_len] token tensors by name: in-domain and off-distribution text, scored side by side."""
    from compress.sources.corpora import GENERAL_EVAL
    from compress.sources.data import load_corpus, token_batches

    return {"validation": token_batches(load_corpus(None), tokenizer, "validation", seq_len, sequences),
            GENERAL_EVAL: token_batches(load_corpus(GENERAL_EVAL, evaluation=True), tokenizer, "all", seq_len,
                                        sequences)}


def _provenance_now() -> dict[str, str]:
    import shlex
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Results files are not code: another benchmark's uncommitted results do not make this one's commit dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", ""
    command = "python -m benchmarks." + Path(sys.argv[0]).stem + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    return {"commit": commit + ("+dirty" if dirty else ""), "command": command}


_STARTED = _provenance_now()
