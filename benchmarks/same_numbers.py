"""Does a change move the numbers? The same short run of every student family at two commits, side by side.

For each ``--families`` entry, ``compress --student F`` with one small budget (``--args``) runs in a git
worktree of ``--base`` and in this checkout, each on a fresh run directory, with the same seeds; the table
holds every row of both runs' reports (PyTorch models and graphs, in-domain and general English) and their
relative difference. A refactor that keeps behaviour shows differences at the level of floating-point noise;
a timing column is left out on purpose (the two runs share a noisy machine).

    python -m benchmarks.same_numbers --base 36307ec
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.plots import provenance
from compress.io import read_json, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
# Small enough for three families at two commits in about half an hour on 2 cores; every stage still runs.
SMALL = ("--target-size 60M --calib-samples 16 --proxy mass --eval-samples 8 --eval-seq-len 64 --distill-tokens 4096 "
         "--distill-seq-len 64 --distill-eval-every 4 --seq-len 64 --quant-calib-samples 2 --quant-decode-calib-tokens 32 "
         "--no-bf16")  # fp32: bf16 matmuls crawl on CPUs without AVX-512 BF16 / AMX


def _command(checkout: Path) -> list[str]:
    """The checkout's own ``compress`` command (its module moved between versions)."""
    module = "compress" if (checkout / "compress" / "__main__.py").exists() else "compress.cli"
    return [sys.executable, "-m", module]


def _run(checkout: Path, family: str, extra: str, out: Path) -> dict[str, float]:
    argv = [*_command(checkout), "--student", family, *shlex.split(extra), "--out", str(out), "--quiet"]
    done = subprocess.run(argv, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed in {checkout} ({done.returncode}):\n{done.stderr[-3000:]}")
    return _rows(read_json(out / "report.json")) if (out / "report.json").exists() else _stage_rows(out)


def _rows(report: dict[str, Any]) -> dict[str, float]:
    """{row / evaluation set: perplexity} of one report."""
    out = {}
    for row in report["rows"]:
        out[f"{row['name']} / in-domain"] = row["perplexity"]
        for name, measured in row.get("evals", {}).items():
            if name != "validation" and measured.get("perplexity") is not None:
                out[f"{row['name']} / {name}"] = measured["perplexity"]
    return out


def _stage_rows(run_dir: Path) -> dict[str, float]:
    """The same from the stages' metrics, for a run stopped before the report (``--stop-after distill``)."""
    out: dict[str, float] = {}
    for stage, prefix in (("prune", "pruned"), ("distill", "distilled")):
        path = run_dir / f"{stage}.metrics.json"
        if not path.exists():
            continue
        metrics = read_json(path)
        if stage == "distill" and "student_perplexity" in metrics:
            out["distilled / in-domain"] = metrics["student_perplexity"]
        for name, measured in metrics.get("evals", {}).items():
            if measured.get("perplexity") is not None:
                out[f"{prefix} / {'in-domain' if name == 'validation' else name}"] = measured["perplexity"]
        if "teacher_perplexity" in metrics:
            out["teacher / in-domain"] = metrics["teacher_perplexity"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare this checkout against")
    parser.add_argument("--families", default="minitron,mobilellm,mu")
    parser.add_argument("--args", default=SMALL, help=f"the run's flags (default: {SMALL})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    meta = provenance()
    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="pdq-same-numbers-"))
    worktree = scratch / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), base], cwd=ROOT, check=True,
                   capture_output=True)
    families: dict[str, Any] = {}
    try:
        for family in args.families.split(","):
            before = _run(worktree, family, args.args, scratch / f"{family}-base")
            after = _run(ROOT, family, args.args, scratch / f"{family}-head")
            rows = {k: {"base": before.get(k), "head": after.get(k),
                        "relative": (after[k] / before[k] - 1) if k in before and k in after and before[k] else None}
                    for k in dict.fromkeys([*before, *after])}
            families[family] = rows
            worst = max((abs(r["relative"]) for r in rows.values() if r["relative"] is not None), default=0.0)
            print(f"{family}: {len(rows)} rows, largest relative difference {worst:.2e}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    result = {**meta, "base": base, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "run_args": args.args,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "families": families}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "same_numbers.json", result)
    write_text(args.out / "same_numbers.md", markdown(result))
    print(markdown(result))


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:,.4f}"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The same runs at two commits", "",
             f"`{result['command']}` on {result['date']}: commit `{result['commit']}` against `{result['base']}`, "
             f"each family run with `--student F {result['run_args']}` (perplexities from each run's report; "
             f"OMP_NUM_THREADS={result.get('omp_num_threads') or 'unset'}).", ""]
    for family, rows in result["families"].items():
        lines += [f"## {family}", "", "| row / set | base | this commit | relative difference |", "|---|---|---|---|"]
        for name, r in rows.items():
            rel = "–" if r["relative"] is None else f"{r['relative']:+.2e}"
            lines.append(f"| {name} | {_number(r['base'])} | {_number(r['head'])} | {rel} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
