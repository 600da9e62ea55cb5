"""Text data: the built-in corpora (compress.sources.corpora), user files, deterministic splits and token packing.

Every corpus is split by document, by a hash of its text, so the split does not depend on file order and never
leaks a document across splits. A mix of sources (the default ``default-mix``) gives each source its share of
every split's sequences.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from compress.errors import DataError
from compress.sources.corpora import CORPORA, DEFAULT_CORPUS, GENERAL_EVAL, fetch_corpus

log = logging.getLogger(__name__)

SPLITS = ("calibration", "train", "validation")
# Per mille of documents in each split: 2% validation, 5% calibration (1024 x 256 tokens needs ~1.5 MB
# of text; the default corpus has ~45 MB), the rest for distillation.
_SPLIT_BOUNDS = {"validation": (0, 20), "calibration": (20, 70), "train": (70, 1000)}
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_JSON_SUFFIXES = (".jsonl", ".json")


class Corpus:
    """A ``datasets.Dataset`` of documents (``text``, and ``source`` for the built-in corpora) with its name and,
    for a mix, each source's share of the tokens of every split. Indexes and iterates like the dataset."""

    def __init__(self, name: str, dataset: Any, shares: dict[str, float] | None = None) -> None:
        self.name, self.dataset, self.shares = name, dataset, shares

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[key]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        return self.dataset.column_names


def fetch_default_corpus() -> list[Path]:
    """The default training corpus and the general evaluation set, fetched on first use (``compress fetch``)."""
    return fetch_corpus(DEFAULT_CORPUS) + fetch_corpus(GENERAL_EVAL)


def _data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    by_kind: dict[str, list[str]] = {"text": [], "json": [], "parquet": []}
    for file in files:
        name = file.name.lower()
        if name.endswith(_TEXT_SUFFIXES):
            by_kind["text"].append(str(file))
        elif name.endswith(_JSON_SUFFIXES):
            by_kind["json"].append(str(file))
        elif name.endswith(".parquet"):
            by_kind["parquet"].append(str(file))
    kinds = [k for k, v in by_kind.items() if v]
    if not kinds:
        raise DataError(
            f"--data {path}: no .txt/.md/.rst, .jsonl/.json or .parquet files found; point it at such files"
        )
    if len(kinds) > 1:
        raise DataError(f"--data {path}: mixes {' and '.join(kinds)} files; pass one kind of file at a time")
    return kinds[0], by_kind[kinds[0]]


def load_corpus(data: str | None, evaluation: bool = False) -> Corpus:
    """A :class:`Corpus` with one document per row in a ``text`` column: a built-in corpus by name (default
    ``default-mix``), local text / JSON-lines / parquet files, or a hub dataset where the machine is online.

    ``evaluation`` allows the evaluation-only corpora (``general-english``), which training must not read."""
    import datasets

    datasets.disable_progress_bars()
    name = DEFAULT_CORPUS if data is None else data
    if name in CORPORA:
        named = CORPORA[name]
        if named.evaluation_only and not evaluation:
            raise DataError(f"--data {name} is the held-out general evaluation set; training on it would make the "
                            f"general evaluation in-domain. Train on {DEFAULT_CORPUS} (the default) or your own files")
        files = [str(f) for f in fetch_corpus(name)]
        try:
            dataset = datasets.load_dataset("json", data_files=files, split="train")
        except Exception as error:
            raise DataError(f"--data {name}: the fetched files in the cache are unreadable ({error}); delete "
                            f"{Path(files[0]).parent} and run `compress fetch`") from error
        return Corpus(name, _with_text_column(dataset, name), named.shares)
    path = Path(data).expanduser()
    if path.exists():
        kind, files = _data_files(path)
    elif "/" in data and not data.startswith((".", "/", "~")) and not Path(data).suffix:
        try:
            dataset = datasets.load_dataset(data, split="train")
        except Exception as error:
            raise DataError(
                f"--data {data}: not a local file or folder, and not loadable as a hub dataset "
                f"({type(error).__name__}); pass local text, jsonl or parquet files"
            ) from error
        return Corpus(data, _with_text_column(dataset, data))
    else:
        raise DataError(f"--data {data}: no such file or folder, and not a built-in corpus "
                        f"({', '.join(CORPORA)}); pass text, jsonl or parquet files")
    try:
        if kind == "text":
            dataset = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
        else:
            dataset = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as error:
        raise DataError(f"--data {data}: could not read it as {kind} ({error}); check the files") from error
    return Corpus(data, _with_text_column(dataset, data))


def _with_text_column(dataset: Any, name: str) -> Any:
    if "text" not in dataset.column_names:
        raise DataError(
            f"--data {name}: no 'text' column (columns: {', '.join(dataset.column_names)}); "
            "provide documents under a 'text' field"
        )
    if len(dataset) == 0:
        raise DataError(f"--data {name}: holds no documents")
    return dataset


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", errors="replace")).digest()[:4], "big")


def document_split(text: str) -> str:
    """Which split a document of the corpus belongs to (by a hash of its text)."""
    bucket = _bucket(text) % 1000
    return next(name for name, (low, high) in _SPLIT_BOUNDS.items() if low <= bucket < high)


def split_texts(dataset: Any, split: str, source: str | None = None) -> list[str]:
    """The documents of one split (``"all"``: every document), in a deterministic order (by hash), chosen by a
    hash of each text; with ``source``, only that source's documents."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}, all")
    low, high = _SPLIT_BOUNDS.get(split, (0, 1000))
    sources = dataset["source"] if source is not None else None
    chosen = []
    for index, text in enumerate(dataset["text"]):
        if not text or not text.strip() or (sources is not None and sources[index] != source):
            continue
        bucket = _bucket(text)
        if low <= bucket % 1000 < high:
            chosen.append((bucket, text))
    chosen.sort()
    return [text for _, text in chosen]


def wants_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text (Gemma does and needs it; SmolLM2 does not)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True).input_ids[:1] == [tokenizer.bos_token_id]


def pack(texts: list[str], tokenizer: Any, seq_len: int, max_sequences: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (sequences, seq_len) token ids.

    Every sequence starts with BOS when the tokenizer wants one. Stops tokenizing once enough tokens exist.
    """
    bos = wants_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    needed = max_sequences * body
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), 64):
        encoded = tokenizer(texts[start : start + 64], add_special_tokens=False).input_ids
        for ids in encoded:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        if len(stream) >= needed:
            break
    count = min(max_sequences, len(stream) // body)
    if count == 0:
        raise DataError(
            f"the data holds {len(stream)} tokens, fewer than one sequence of {seq_len}; "
            "add text or lower the sequence length"
        )
    ids = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    if bos:
        ids = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), ids], dim=1)
    return ids


def token_batches(dataset: Any, tokenizer: Any, split: str, seq_len: int, sequences: int) -> torch.Tensor:
    """``sequences`` packed sequences from ``split`` (``"all"``: every document); fewer (with a warning) when the
    split is small. A mix (a :class:`Corpus` with shares) gives each source its share of the sequences, packed
    from that source's documents alone and spread evenly through the result."""
    shares = getattr(dataset, "shares", None)
    if not shares:
        ids = pack(split_texts(dataset, split), tokenizer, seq_len, sequences)
    else:
        counts = _apportion(shares, sequences)
        texts = {source: split_texts(dataset, split, source) for source in counts}
        parts = {source: pack(texts[source], tokenizer, seq_len, count) for source, count in counts.items() if count}
        short = sum(counts[k] - len(v) for k, v in parts.items())
        for source, part in parts.items():  # a source too small for its share: the others make up for it
            if short and len(part) == counts[source]:
                parts[source] = pack(texts[source], tokenizer, seq_len, counts[source] + short)
                short -= len(parts[source]) - len(part)
        if any(len(parts[k]) != counts[k] for k in parts):
            log.info("the %s split of %s: sequences per source %s (shares %s)", split, getattr(dataset, "name", "the mix"),
                     {k: len(v) for k, v in parts.items()}, shares)
        keys = [((i + 0.5) / len(part), n) for n, part in enumerate(parts.values()) for i in range(len(part))]
        order = sorted(range(len(keys)), key=lambda i: keys[i])  # each source spread evenly through the result
        ids = torch.cat(list(parts.values()))[order]
    if ids.shape[0] < sequences:
        log.warning(
            "the %s split holds only %d sequences of %d tokens (asked for %d); using them all",
            split, ids.shape[0], seq_len, sequences,
        )
    return ids


def _apportion(shares: dict[str, float], total: int) -> dict[str, int]:
    """Whole sequence counts per source, in proportion to ``shares``, adding up to ``total`` (largest remainders)."""
    norm = sum(shares.values())
    exact = {k: total * v / norm for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for key in sorted(exact, key=lambda k: counts[k] - exact[k])[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def text_file_ids(path: str, tokenizer: Any, seq_len: int, max_sequences: int = 1 << 30) -> torch.Tensor:
    """Token sequences of one user text file, for ``compress eval --text FILE``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--text {path}: no such file; pass a UTF-8 text file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"--text {path}: not UTF-8 text ({error}); convert it to UTF-8") from error
    return pack([text], tokenizer, seq_len, max_sequences)


# Pairs are split by a hash of input and output too, but task sets are small: a tenth is held out.
_PAIR_SPLIT_BOUNDS = {"validation": (0, 100), "train": (100, 1000)}
PAIR_COLUMNS = ("input", "output")


def load_pairs(data: str) -> Any:
    """A ``datasets.Dataset`` of (input, output) pairs, from .jsonl/.json or .parquet with ``input`` and
    ``output`` text columns (one pair per row) and optionally a ``split`` column (``train`` / ``validation``)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder; pass .jsonl or .parquet files of "
                        '{"input": ..., "output": ...} rows')
    kind, files = _data_files(path)
    if kind == "text":
        raise DataError(f"--data {data}: plain text has no (input, output) pairs; pass .jsonl or .parquet rows "
                        'with "input" and "output" fields')
    try:
        dataset = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as error:
        raise DataError(f"--data {data}: could not read it as {kind} ({error}); check the files") from error
    missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(f"--data {data}: no {' or '.join(repr(c) for c in missing)} column (columns: "
                        f"{', '.join(dataset.column_names)}); give each row an \"input\" and an \"output\" text")
    dataset = dataset.filter(lambda row: bool(row["input"] and str(row["input"]).strip()
                                              and row["output"] and str(row["output"]).strip()))
    if len(dataset) == 0:
        raise DataError(f"--data {data}: no row has both a non-empty input and a non-empty output")
    return dataset


def split_pairs(dataset: Any, split: str) -> list[tuple[str, str]]:
    """The pairs of one split (``train`` or ``validation``), in a deterministic order: the rows whose ``split``
    column says so when the data has one, else a tenth of the pairs, chosen by a hash of each, for validation."""
    if split not in _PAIR_SPLIT_BOUNDS:
        raise ValueError(f"unknown split {split!r} for pairs; allowed: {', '.join(_PAIR_SPLIT_BOUNDS)}")
    low, high = _PAIR_SPLIT_BOUNDS[split]
    given = dataset["split"] if "split" in dataset.column_names else [None] * len(dataset)
    unknown = sorted({str(g) for g in given if g is not None} - set(_PAIR_SPLIT_BOUNDS))
    if unknown:
        raise DataError(f"the pairs' split column holds {', '.join(map(repr, unknown[:3]))}; use "
                        f"{' or '.join(map(repr, _PAIR_SPLIT_BOUNDS))}, or leave the column out")
    chosen = []
    for source, target, named in zip(dataset["input"], dataset["output"], given, strict=True):
        bucket = _bucket(f"{source}\x00{target}")
        if named == split if named is not None else low <= bucket % 1000 < high:
            chosen.append((bucket, str(source), str(target)))
    chosen.sort()
    return [(source, target) for _, source, target in chosen]


def pair_batches(dataset: Any, tokenizer: Any, split: str, max_input_tokens: int, max_output_tokens: int) -> Any:
    """The pairs of ``split`` as :class:`distill.pairs.Pairs`: the input (BOS first when the tokenizer wants it,
    then the input's last tokens, ``max_input_tokens`` in all), then the output and EOS (cut to its first
    ``max_output_tokens``)."""
    from distill.pairs import Pairs

    pairs = split_pairs(dataset, split)
    if not pairs:
        raise DataError(f"the {split} split of the pairs is empty ({len(dataset)} pairs in all; without a 'split' "
                        "column a tenth is held out for validation by a hash of each pair); add pairs")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    inputs = pair_inputs(tokenizer, [s for s, _ in pairs], max_input_tokens)
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False).input_ids
    outputs = [(ids + eos)[:max_output_tokens] for ids in targets]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    return Pairs.from_lists(inputs, outputs, pad_id=pad)


def pair_inputs(tokenizer: Any, texts: list[str], max_input_tokens: int) -> list[list[int]]:
    """The token ids a pair's input is read as, in training and in evaluation alike: BOS when the tokenizer wants
    it, then the input's last tokens, ``max_input_tokens`` in all."""
    bos = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []
    sources = tokenizer(list(texts), add_special_tokens=False).input_ids
    # Long inputs keep their end (nearest the output); BOS stays first, as models that want it need it there.
    keep = max(0, max_input_tokens - len(bos))
    return [bos + ids[len(ids) - min(keep, len(ids)):] for ids in sources]


def eval_set_name(data: str) -> str:
    """The name an evaluation set is reported under: a built-in corpus's name, else the file or folder's stem."""
    if data in CORPORA:
        return data
    name = Path(data).expanduser().stem or Path(data).expanduser().name
    if name == "validation":
        raise DataError(f"--eval-data {data}: 'validation' names the in-domain split; rename the file or folder")
    return name
