"""Characters <-> ids.

A character is one Unicode code point. The vocab is the sorted set of code points of the training
text, so the same text always gives the same ids, and it travels inside every checkpoint.
Encoding works on whole numpy arrays of code points: no Python loop per character.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from .errors import VocabError

Unknown = Literal["error", "skip"]

_CODE_POINTS = 0x110000  # every Unicode code point (surrogates included) indexes one flat table


def text_to_codes(text: str) -> np.ndarray:
    """The code points of `text` as uint32, via one C-level encode."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def codes_to_text(codes: np.ndarray) -> str:
    return np.ascontiguousarray(codes, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")


def describe_char(ch: str) -> str:
    """A character as a user can read it in a one-line message, escaped when unprintable."""
    if ch.isprintable() and not ch.isspace():
        return repr(ch)
    name = unicodedata.name(ch, "")
    escaped = ch.encode("unicode_escape").decode("ascii")
    return f"'{escaped}'" + (f" ({name})" if name else "")


def id_dtype(size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocab of `size` characters."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise VocabError(f"vocab of {size} characters is too large")


UNK = "\ufffd"  # stands for every rare character folded away by --min-count


class Vocab:
    """An ordered set of characters; id i is `chars[i]`.

    `folded` lists rare characters that are not modelled one by one: they all share the id of the
    unknown symbol U+FFFD, whose probability the scorer spreads evenly over them (so the reported
    cross-entropy still prices each of those characters honestly).
    """

    def __init__(self, chars: Sequence[str], folded: Sequence[str] = ()) -> None:
        chars, folded = list(chars), list(folded)
        if not chars:
            raise VocabError("empty vocab", "the text has no characters")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars + folded):
            raise VocabError("a vocab entry is not a single character")
        if len(set(chars + folded)) != len(chars) + len(folded):
            raise VocabError("the vocab lists a character twice")
        if folded and UNK not in chars:
            raise VocabError("a vocab with folded characters needs the unknown symbol U+FFFD")
        self.chars: tuple[str, ...] = tuple(chars)
        self.folded: tuple[str, ...] = tuple(folded)
        self.unk_id: int | None = chars.index(UNK) if folded else None
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        all_codes = np.array([ord(c) for c in chars + folded], dtype=np.uint32)
        all_ids = np.concatenate([np.arange(len(chars)), np.full(len(folded), self.unk_id or 0)]).astype(np.int64)
        self._table = np.full(_CODE_POINTS, -1, dtype=np.int32)  # 4.4 MB: lookup is one gather
        self._table[all_codes] = all_ids
        self.dtype = id_dtype(len(chars))

    @classmethod
    def from_counts(cls, counts: dict[int, int], *, min_count: int = 1) -> Vocab:
        """Characters seen at least `min_count` times, sorted by code point; the rest are folded."""
        keep = sorted(c for c, n in counts.items() if n >= min_count)
        rare = sorted(c for c, n in counts.items() if n < min_count and chr(c) != UNK)
        if not rare:
            return cls([chr(c) for c in keep])
        chars = sorted({chr(c) for c in keep} | {UNK})
        return cls(chars, [chr(c) for c in rare])

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls.from_codes(np.unique(text_to_codes(text)))

    @classmethod
    def from_codes(cls, codes: Iterable[int]) -> Vocab:
        """Sorted by code point, so the ids depend only on the set of characters."""
        return cls([chr(int(c)) for c in sorted(set(int(c) for c in codes))])

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return isinstance(ch, str) and len(ch) == 1 and self.lookup(text_to_codes(ch))[0] >= 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars and self.folded == other.folded

    def __hash__(self) -> int:
        return hash((self.chars, self.folded))

    def __repr__(self) -> str:
        preview = "".join(self.chars[:40])
        return f"Vocab({len(self)} chars: {preview!r}{'...' if len(self) > 40 else ''})"

    @property
    def fold_penalty(self) -> tuple[int, float] | None:
        """(unknown-symbol id, ln of the number of folded characters): the extra nats each folded
        character costs when the unknown symbol's probability is spread evenly over them."""
        if self.unk_id is None:
            return None
        return self.unk_id, math.log(len(self.folded))

    @property
    def start_id(self) -> int:
        """The id that stands before the first character of a text: newline if known, else id 0."""
        ids = self.lookup(text_to_codes("\n"))
        return int(ids[0]) if ids[0] >= 0 else 0

    @property
    def fingerprint(self) -> str:
        """A short hash of the character list, for cache keys and compatibility checks."""
        joined = "\0".join(self.chars) + "\1" + "\0".join(self.folded)
        return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    @property
    def codes(self) -> np.ndarray:
        """The code point of each id (uint32, read-only)."""
        view = self._codes.view()
        view.flags.writeable = False
        return view

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Ids (int32) for an array of code points; -1 where the character is unknown."""
        return self._table[np.asarray(codes, dtype=np.uint32)]

    def encode(self, text: str, *, unknown: Unknown = "error") -> np.ndarray:
        """Ids in the vocab's smallest dtype. Unknown characters raise, or are dropped with 'skip'."""
        ids = self.lookup(text_to_codes(text))
        missing = ids < 0
        if missing.any():
            if unknown == "error":
                raise self.unknown_error(np.unique(text_to_codes(text)[missing]))
            ids = ids[~missing]
        return ids.astype(self.dtype)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise VocabError(f"id out of range for a vocab of {len(self)} characters")
        return codes_to_text(self._codes[ids])

    def unknown_error(self, codes: Iterable[int], *, what: str = "the text") -> VocabError:
        """One line naming the characters the model never saw, and what to do about it."""
        chars = [chr(int(c)) for c in codes]
        shown = ", ".join(describe_char(c) for c in chars[:10])
        more = f" and {len(chars) - 10} more" if len(chars) > 10 else ""
        return VocabError(
            f"{what} has {len(chars)} character{'s' if len(chars) != 1 else ''} the model never saw: {shown}{more}",
            "remove or replace them, or train on text that contains them",
        )
