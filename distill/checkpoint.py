"""Resumable training state: weights and optimizer tensors in safetensors, the rest in JSON.

State is taken through ``torch.distributed.checkpoint.state_dict`` as full, unsharded tensors keyed by
parameter name, so the same checkpoint format serves one process, DDP and FSDP (where every process must
take part in gathering the shards, and process 0 writes). Each checkpoint is written to a temporary
folder and renamed into place, so a kill at any moment leaves the previous checkpoint intact; a
checkpoint counts only once its ``state.json`` exists.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from distill.config import DistillError

_PREFIX = "step-"
FORMAT = 2  # 1 (before FSDP): optimizer state keyed by parameter index


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same parameter object (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name.removeprefix("module."))  # DDP's wrapper is not in the names
    return {name: group for group in names.values() for name in group}


def _stored_once(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names whose tensor is already stored under another name (safetensors refuses shared memory)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in weights.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous()
    return out


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{"state": {name: {key: value}}, "param_groups": [...]} -> tensors "name/key" and the JSON rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    # JSON turned tuples (AdamW's betas) into lists; only "params" is a list in a param group
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: Path, step: int, root: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict[str, Any], keep: int = 2
) -> Path | None:
    """Write ``folder/step-NNNNNNN`` atomically and prune older checkpoints beyond ``keep``.

    ``root`` is the module that owns every trained parameter (plain, DDP- or FSDP-wrapped). Every process
    must call this; process 0 writes and gets the path, the others get None.
    """
    from torch.distributed.checkpoint.state_dict import (  # ~1 s to import: only when checkpointing
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(root, options=gather)
    optimizer = get_optimizer_state_dict(root, optimizers, options=gather)
    if _rank() != 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{target.name}.tmp-"))
    try:
        save_file(_stored_once(weights), str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer)
        save_file({**tensors, "rng": torch.get_rng_state()}, str(tmp / "optimizer.safetensors"))
        record = {**state, "step": step, "format": FORMAT, "optimizer": meta}
        (tmp / "state.json").write_text(json.dumps(record, indent=1))
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


def load_checkpoint(path: Path, root: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore weights, optimizer state and RNG in place; return the JSON state (step, tokens, history...).

    Every process reads the files itself (one machine, or a folder all machines share).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    scatter = StateDictOptions(full_state_dict=True)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise DistillError(f"checkpoint {path} was written by an older version of pdq-compress; "
                           f"delete {path.parent} (or pass --no-resume) to start the distillation over")
    weights = load_file(str(path / "model.safetensors"))
    for name, group in _aliases(root).items():
        if name not in weights and (stored := next((n for n in group if n in weights), None)) is not None:
            weights[name] = weights[stored]
    try:
        set_model_state_dict(root, weights, options=scatter)
    except RuntimeError as error:
        raise DistillError(f"checkpoint {path} does not fit the model ({error}); delete {path.parent} "
                           "(or pass --no-resume) to start the distillation over") from error
    tensors = load_file(str(path / "optimizer.safetensors"))
    rng = tensors.pop("rng")
    set_optimizer_state_dict(root, optimizers, _unflatten_optimizer(tensors, state.pop("optimizer")), options=scatter)
    torch.set_rng_state(rng)
    return state
