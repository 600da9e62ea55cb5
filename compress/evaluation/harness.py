"""Downstream tasks through lm-eval (EleutherAI's evaluation harness), for ``compress eval --lm-eval TASKS``.

The model is loaded as every other command loads it (a built-in alias, a folder, a .gguf file) and handed to
lm-eval's own Hugging Face wrapper (``HFLM``), so the harness scores it exactly as it scores any HF model. Tasks
are lm-eval task names or task YAML files (their folders are added to lm-eval's task index). On this machine the
hub is out of reach: tasks must read local data (``dataset_path: json`` with ``dataset_kwargs.data_files``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from compress.errors import ConfigError

log = logging.getLogger(__name__)


def run_lm_eval(model: str, tasks: list[str], batch_size: int = 8, limit: int | None = None,
                trust_remote_code: bool = False) -> dict[str, Any]:
    """lm-eval's metrics of ``model`` on ``tasks``: {"tasks": {task: {metric: value}}, "lm_eval_version": ...}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ConfigError("--lm-eval needs the lm-eval package: pip install 'pdq-compress[eval]' "
                          "(scripts/setup.sh installs it)") from error
    from compress.sources.teachers import load_teacher

    if not tasks:
        raise ConfigError("--lm-eval: name at least one task (a task name or a task .yaml file)")
    folders, names = [], []
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"--lm-eval {task}: no such task file")
            folders.append(str(path.resolve().parent))
            names.append(_task_name(path))
        else:
            names.append(task)
    manager = TaskManager(include_path=sorted(set(folders)) or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--lm-eval: unknown task(s) {', '.join(unknown)}; pass lm-eval task names or task .yaml files")
    loaded, tokenizer = load_teacher(model, trust_remote_code)
    wrapped = HFLM(pretrained=loaded.eval(), tokenizer=tokenizer, batch_size=batch_size, device=str(loaded.device))
    results = lm_eval.simple_evaluate(model=wrapped, tasks=names, task_manager=manager, limit=limit,
                                      log_samples=False)
    scores = {task: {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "alias"}
              for task, metrics in results["results"].items()}
    return {"tasks": scores, "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}


def _task_name(path: Path) -> str:
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--lm-eval {path}: not YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(config, dict) or "task" not in config:
        raise ConfigError(f"--lm-eval {path}: a task file needs a 'task:' name")
    return str(config["task"])
