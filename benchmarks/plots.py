"""Plot pieces every benchmark figure shares, and the provenance every result records."""

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
