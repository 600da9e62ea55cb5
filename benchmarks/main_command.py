"""The README's main command, run once as a user would and recorded: wall time, the run's summary and report.

Runs ``./scripts/setup.sh && .venv/bin/compress --teacher smollm2-135m --target-size 0.67x`` from the
checkout's root on a fresh run directory (an existing ``runs/<teacher>-<target>`` is renamed aside first,
never deleted), times it end to end and writes ``benchmarks/results/main_command.{md,json}`` with the
commit, the command, the printed summary and the run's ``report.md``. Nothing else should run meanwhile.
``--teacher``, ``--target-size`` and ``--flags`` run the same command for another teacher (results named
``main_command_<teacher>``); ``--name N`` names the results ``N`` and runs into ``runs/N`` (a second variant of one
teacher); ``--no-setup`` leaves the setup out.

    python -m benchmarks.main_command
    python -m benchmarks.main_command --teacher gemma3-270m --no-setup --flags "--distill-tokens 20000 --no-bf16"
    python -m benchmarks.main_command --teacher gemma3-270m --no-setup --name main_command_gemma3-270m-blocks \
        --flags "--axes heads,hidden,mlp --distill-tokens 20000 --no-bf16"
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.plots import machine, provenance
from compress.io import read_json, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEFAULT_TEACHER, DEFAULT_TARGET = "smollm2-135m", "0.67x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--target-size", default=DEFAULT_TARGET)
    parser.add_argument("--flags", default="", help="more compress flags, as one string")
    parser.add_argument("--no-setup", action="store_true", help="run compress only (the setup is done)")
    parser.add_argument("--name", default=None, help="results stem and run folder under runs/ (default: by teacher)")
    args = parser.parse_args()
    meta = provenance()
    command = " ".join(filter(None, (
        "" if args.no_setup else "./scripts/setup.sh &&",
        f".venv/bin/compress --teacher {args.teacher} --target-size {args.target_size}", args.flags,
        f"--out runs/{args.name}" if args.name else "")))
    run_dir = ROOT / "runs" / (args.name or f"{args.teacher}-{args.target_size}")
    stem = args.name or ("main_command" if args.teacher == DEFAULT_TEACHER else f"main_command_{args.teacher}")
    title = ("The README's main command, one run" if stem == "main_command"
             else f"The main command on {args.teacher}{' (' + args.flags + ')' if args.flags else ''}, one run")
    if run_dir.exists():
        aside = run_dir.with_name(f"{run_dir.name}.before-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"moved the previous run to {aside}", file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the main command failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    summary = [line for line in lines[start:] if line.strip()]
    report = read_json(run_dir / "report.json")
    result = {**meta, "command": command, "recorded_by": meta["command"], "machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "wall_seconds": seconds, "summary": summary,
              "report": report}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", result)
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in (run_dir / "report.md").read_text().splitlines())
    write_text(args.out / f"{stem}.md", (
        f"# {title}\n\n`{command}` on {result['date']} at commit `{meta['commit']}` ({result['machine']}), "
        f"{'setup not included' if args.no_setup else 'setup included'}, recorded by `{meta['command']}`: wall time {seconds / 60:.1f} min "
        f"({seconds:,.0f} s).\n\n```\n" + "\n".join(summary) + "\n```\n\nIts report.md:\n\n" + body + "\n"))
    print("\n".join(summary))
    print(f"wall time {seconds:,.0f} s")


if __name__ == "__main__":
    main()
