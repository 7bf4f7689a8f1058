"""Text sources: the shipped excerpt, cache and fetch errors, token haystacks."""

import random
import subprocess

import pytest

from kvdrive.errors import KvdriveError
from kvdrive.eval import corpus
from kvdrive.eval.corpus import SOURCES, TokenHaystack, load_text, unwrap


class CharTokenizer:
    """One token per character (ids = code points); no special tokens."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVDRIVE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_shipped_excerpt_loads_with_provenance():
    c = load_text("persuasion-excerpt")
    assert c.text.startswith("Chapter 1\n") and "Sir Walter Elliot" in c.text
    assert "Chapter 8" in c.text and "Chapter 9" not in c.text
    assert 100_000 < c.chars <= 150_000
    assert c.licence == "public domain" and c.name == "persuasion-excerpt" and "Persuasion" in c.source
    assert SOURCES[c.name].package is None
    notice = (corpus.DATA_DIR / "NOTICE").read_text()
    assert "public domain" in notice.lower() and "r-cran-janeaustenr" in notice


def test_every_source_names_a_licence():
    for src in SOURCES.values():
        assert src.licence and src.description


def test_unknown_source_lists_the_choices():
    with pytest.raises(KvdriveError, match="persuasion-excerpt"):
        load_text("gutenberg")


def test_unfetched_source_names_the_fetch_command(empty_cache):
    assert not corpus.is_cached("austen")
    with pytest.raises(
        KvdriveError, match=r"python -m kvdrive.eval.corpus austen.*apt-get download r-cran-janeaustenr"
    ):
        load_text("austen")


def test_min_chars_refuses_a_short_text():
    with pytest.raises(KvdriveError, match="fewer than the 10000000"):
        load_text("persuasion-excerpt", min_chars=10_000_000)


def test_fetch_without_apt_get_says_so(empty_cache, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(KvdriveError, match="needs apt-get"):
        load_text("jargon", fetch_missing=True)


def test_failed_download_suggests_apt_get_update(empty_cache, monkeypatch):
    def fail(cmd, **kw):
        raise subprocess.CalledProcessError(100, cmd, stderr=b"E: Unable to locate package jargon-text")

    monkeypatch.setattr(corpus.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(corpus.subprocess, "run", fail)
    with pytest.raises(KvdriveError, match="Unable to locate package.*apt-get update"):
        corpus.fetch("jargon")
    assert not corpus.text_cache("jargon").exists()


def test_unwrap_joins_lines_but_keeps_paragraphs():
    assert unwrap("one\ntwo.\n\nThree\nfour") == "one two.\n\nThree four"


def test_haystack_sample_is_exact_and_starts_at_a_paragraph():
    text = "".join(f"Paragraph {i} says something. It ends here.\n\n" for i in range(200))
    hay = TokenHaystack(CharTokenizer(), text)
    for seed in range(5):
        ids = hay.sample(500, random.Random(seed))
        assert len(ids) == 500
        assert CharTokenizer().decode(ids).startswith("Paragraph ")
    assert hay.sample(500, random.Random(3)) == hay.sample(500, random.Random(3))


def test_haystack_too_long_for_the_text():
    with pytest.raises(KvdriveError, match="too short"):
        TokenHaystack(CharTokenizer(), "A short text.\n\nTwo paragraphs.").sample(1000, random.Random(0))


def test_boundaries_follow_sentence_ends():
    tok = CharTokenizer()
    ids = tok.encode('He spoke. "Yes!" she said?\n"No')
    bounds = TokenHaystack(tok, "x").boundaries(ids)
    assert bounds[0] == 0 and bounds[-1] == len(ids)
    assert bounds == [
        0,
        len("He spoke."),
        len('He spoke. "Yes!"'),
        len('He spoke. "Yes!" she said?'),
        len('He spoke. "Yes!" she said?\n'),
        len(ids),
    ]  # never after an opening quote


@pytest.mark.slow
def test_fetch_austen_from_debian(empty_cache):
    path = corpus.fetch("austen")
    c = load_text("austen")
    assert path == corpus.text_cache("austen") and corpus.is_cached("austen")
    assert c.chars > 3_500_000
    for title in (
        "Persuasion",
        "PRIDE AND PREJUDICE",
        "SENSE AND SENSIBILITY",
        "EMMA",
        "MANSFIELD PARK",
        "NORTHANGER ABBEY",
    ):
        assert title in c.text
    # The shipped excerpt is verbatim from this package.
    assert load_text("persuasion-excerpt").text.rstrip() in c.text
