"""The ``compress`` command: a thin face of the API. Flags map one-to-one onto CompressConfig fields
(:mod:`compress.app.flags`); the subcommands live in :mod:`compress.app.commands`.

Exit codes: 0 success, 2 a user error (bad flag, missing file, infeasible target), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from compress.app import commands
from compress.app.flags import add_config_flags, config_from, flag_names, setup_logging
from compress.app.summary import summary
from compress.errors import CompressError

_EPILOG = """examples:
  compress --teacher smollm2-135m --target-size 0.67x       # every stage, report in runs/smollm2-135m-0.67x/
  compress --teacher smollm2-135m --target-size 0.67x --out runs/demo --stop-after prune
  compress --teacher ./my-llama --data ./corpus/ --target-size 90M --axes heads,hidden,mlp,layers
  compress fetch                       # download the built-in teachers and the default data
  compress eval runs/demo/pruned --text notes.txt
  compress --teacher smollm2-135m --target-size 0.67x --out runs/demo --stop-after distill --distill-tokens 200000
  torchrun --nproc-per-node 2 -m compress distill --student runs/demo/pruned --out runs/demo/student-ddp
  compress --teacher smollm2-135m --target-size 0.67x --out runs/demo --stop-after quantize --quant a16w8 --npu-profile qnn-htp
  compress --teacher smollm2-135m --target-size 1x --out runs/teacher --stop-after quantize --quant a8w8 --npu-profile generic-a8w8
  compress inspect runs/demo/onnx/model.a16w8.onnx --npu-profile qnn-htp
  compress inspect runs/demo/onnx/model.a16w8.onnx --compile qnn-htp   # Qualcomm's HTP compiler: refused nodes
  compress task settings-agent --out data/settings          # requests to a desktop's settings -> one-line calls
  compress finetune --student runs/demo/student --data data/settings/train.jsonl --out runs/demo/settings
  compress eval runs/demo --pairs data/settings/test.jsonl --graph   # exact match and response time of the graphs
  compress report runs/demo                                  # rebuild report.md / .json / plots

exit codes: 0 done, 1 a failure (or inspect found violations), 2 a usage error (bad flag, missing file,
unusable run directory), 130 interrupted (rerun the same command to continue)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Prune a teacher language model to a target size with activation-based importance, distill it, "
        "and export static-shape float and integer (QDQ) ONNX graphs for an NPU.",
        epilog=_EPILOG + "\nsubcommands: compress fetch --help, compress eval --help, compress distill --help, "
        "compress task --help, compress finetune --help, compress inspect --help, compress report --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser, flag_names())
    parser.add_argument("--config", help="a YAML (.yaml, .yml) or JSON file of config fields, nested by section as "
                        "--print-config shows them or flat as the flags are named (e.g. the config.json of an earlier "
                        "run); flags given here override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines, only the summary")
    return parser


_SUBCOMMANDS = {"fetch": commands.fetch, "eval": commands.evaluate, "task": commands.task, "distill": commands.distill,
                "finetune": commands.finetune, "inspect": commands.inspect, "report": commands.report}


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: cleanup runs, finished stages stay


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    quiet = "--quiet" in argv
    setup_logging(quiet)
    from distill.speed import keep_freed_memory

    keep_freed_memory()  # every stage allocates and frees large tensors: scoring, evaluation, distillation
    try:
        if argv and argv[0] in _SUBCOMMANDS:
            return _SUBCOMMANDS[argv[0]](argv[1:])
        args = _parser().parse_args(argv)
        config = config_from(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        from compress.app.pipeline import run

        result = run(config, progress=not args.quiet)
        print(summary(result))
        return 0
    except CompressError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue from the last finished stage", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
