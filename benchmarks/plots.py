"""Plot pieces every benchmark figure shares."""

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
