"""Resumable training state: weights and optimizer tensors in safetensors, the rest in JSON.

Each checkpoint is written to a temporary folder and renamed into place, so a kill at any moment
leaves the previous checkpoint intact; a checkpoint counts only once its ``state.json`` exists.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

_PREFIX = "step-"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    step: int,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    extra_modules: nn.Module | None,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``folder/step-NNNNNNN`` atomically and prune older checkpoints beyond ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{target.name}.tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if extra_modules is not None and len(list(extra_modules.parameters())):
            save_model(extra_modules, str(tmp / "extra.safetensors"))
        metas = []
        tensors: dict[str, torch.Tensor] = {"rng": torch.get_rng_state()}
        for number, optimizer in enumerate(optimizers):
            flat, meta = _flatten_optimizer(optimizer.state_dict())
            tensors.update({f"opt{number}.{k}": v for k, v in flat.items()})
            metas.append(meta)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizers": metas}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(checkpoints(folder))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.glob(f"{_PREFIX}*") if p.is_dir() and (p / "state.json").exists())


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], extra_modules: nn.Module | None
) -> dict[str, Any]:
    """Restore weights, optimizer state and RNG in place; return the JSON state (step, tokens, history...)."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or any(not _is_tied_alias(model, name) for name in missing):
        raise RuntimeError(f"checkpoint {path} does not fit the model (missing {missing}, unexpected {unexpected})")
    if extra_modules is not None and (path / "extra.safetensors").exists():
        load_model(extra_modules, str(path / "extra.safetensors"))
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng"))
    for number, (optimizer, meta) in enumerate(zip(optimizers, state["optimizers"], strict=True)):
        prefix = f"opt{number}."
        flat = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        optimizer.load_state_dict(_unflatten_optimizer(flat, meta))
    return state


def _is_tied_alias(model: nn.Module, name: str) -> bool:
    """True when ``name`` shares its storage with another parameter (save_model stores tied tensors once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    pointer = params[name].data_ptr()
    return any(other != name and p.data_ptr() == pointer for other, p in params.items())
