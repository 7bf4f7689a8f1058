"""Real prose for perplexity and haystacks, from sources that work offline.

``austen``: Jane Austen's six novels (public domain), from Debian's ``r-cran-janeaustenr``
package (an R lazy-load database, read with the PyPI package ``rdata``), fetched once
with ``apt-get download`` into ``~/.cache/kvdrive/text``. ``persuasion-excerpt``: the
first chapters of Persuasion shipped with kvdrive (kvdrive/eval/data), so tests and a
first run need nothing fetched.
"""

from __future__ import annotations

import gzip
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvdrive.env import cache_dir
from kvdrive.errors import KvdriveError

DATA = Path(__file__).parent / "data"
NOVELS = ("persuasion", "prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey")
PACKAGE = "r-cran-janeaustenr"


@dataclass(frozen=True)
class Corpus:
    text: str
    source: str
    licence: str


def _austen_dir() -> Path:
    root = cache_dir() / "text" / PACKAGE
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    if (data / "Rdata.rdb").exists():
        return data
    root.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=root, check=True, capture_output=True, timeout=300)
        deb = next(root.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError, StopIteration) as err:
        raise KvdriveError(f"could not fetch {PACKAGE} ({err}); run 'apt-get update' first, or use "
                           "--text persuasion-excerpt") from None
    return data


def austen_novels() -> dict[str, str]:
    """{novel: text} of the six novels, paragraphs joined by blank lines."""
    try:
        import rdata
    except ImportError:
        raise KvdriveError("reading the Austen corpus needs the 'rdata' package: pip install rdata") from None
    data = _austen_dir()
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
    blob = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (off, length) in index["variables"].items():
        # Each object: a 4-byte length, then zlib-compressed R serialization.
        raw = zlib.decompress(blob[int(off) + 4 : int(off) + int(length)])
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        novels[str(name)] = "\n".join(str(x) for x in lines)
    return novels


def load_text(source: str = "austen") -> Corpus:
    """The whole corpus of ``source``: ``austen``, ``persuasion-excerpt`` or a UTF-8 text file."""
    if source == "persuasion-excerpt":
        return Corpus((DATA / "persuasion-excerpt.txt").read_text(), "Jane Austen, Persuasion, chapters 1-8 "
                      "(shipped excerpt)", "public domain")
    if source == "austen":
        novels = austen_novels()
        return Corpus("\n\n".join(novels[n] for n in NOVELS), f"Jane Austen's six novels, Debian {PACKAGE}",
                      "public domain (package code MIT)")
    path = Path(source).expanduser()
    if path.is_file():
        return Corpus(path.read_text(encoding="utf-8", errors="replace"), str(path), "as the file's own")
    raise KvdriveError(f"unknown text source {source!r}; use austen, persuasion-excerpt or a text file")
