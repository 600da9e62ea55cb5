"""The README's main command, run once as a user would and recorded: wall time, the run's summary and report.

Runs ``./scripts/setup.sh && .venv/bin/compress --teacher smollm2-135m --target-size 0.67x`` from the
checkout's root on a fresh run directory (an existing ``runs/smollm2-135m-0.67x`` is renamed aside first,
never deleted), times it end to end and writes ``benchmarks/results/main_command.{md,json}`` with the
commit, the command, the printed summary and the run's ``report.md``. Nothing else should run meanwhile.

    python -m benchmarks.main_command
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.plots import provenance
from compress.io import read_json, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
COMMAND = "./scripts/setup.sh && .venv/bin/compress --teacher smollm2-135m --target-size 0.67x"
RUN_DIR = ROOT / "runs" / "smollm2-135m-0.67x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    meta = provenance()
    if RUN_DIR.exists():
        aside = RUN_DIR.with_name(f"{RUN_DIR.name}.before-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
        RUN_DIR.rename(aside)
        print(f"moved the previous run to {aside}", file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run(["bash", "-c", COMMAND], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the main command failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    summary = [line for line in lines[start:] if line.strip()]
    report = read_json(RUN_DIR / "report.json")
    result = {**meta, "command": COMMAND, "recorded_by": "python -m benchmarks.main_command",
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "wall_seconds": seconds, "summary": summary,
              "report": report}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "main_command.json", result)
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in (RUN_DIR / "report.md").read_text().splitlines())
    write_text(args.out / "main_command.md", (
        f"# The README's main command, one run\n\n`{COMMAND}` on {result['date']} at commit `{meta['commit']}`, "
        f"setup included, recorded by `python -m benchmarks.main_command`: wall time {seconds / 60:.1f} min "
        f"({seconds:,.0f} s).\n\n```\n" + "\n".join(summary) + "\n```\n\nIts report.md:\n\n" + body + "\n"))
    print("\n".join(summary))
    print(f"wall time {seconds:,.0f} s")


if __name__ == "__main__":
    main()
