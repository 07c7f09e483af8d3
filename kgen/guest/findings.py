"""A finding: what a check saw, as the text a person reads and as the fields a report attaches it by.

Checks return lists of findings. A `Finding` is a `str` (the line printed under a failed check, unchanged for every
consumer that only prints), and it carries where it applies: the virtual range, the physical frames, the entries the
walk read and the address space. Reports (`kgen inspect` text, JSON, HTML) place a finding by those fields only,
never by numbers that happen to appear in its text (a symbol offset, a kernel base quoted for context). A plain `str`
returned by a check is a finding that names no place: it is listed with its check and attached to no range.

`info` findings are facts worth showing that are not failures (a frame mapped twice, a guard page): a check that
returns only info findings holds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from kgen.guest.pagewalk import EntryRef


class Finding(str):
    """One line of a check's verdict, with the places it concerns."""

    vrange: tuple[int, int] | None      # [start, end) of the virtual addresses concerned
    frames: tuple[int, ...]             # physical frame addresses concerned
    chain: tuple["EntryRef", ...]       # the entries the walk read to get there, top level first
    space: str | None                   # the address space judged, when not the one in CR3 at the stop
    info: bool                          # a fact to show, not a failure

    def __new__(cls, text: str, *, vrange: tuple[int, int] | None = None, frames: Iterable[int] = (),
                chain: Iterable["EntryRef"] = (), space: str | None = None, info: bool = False) -> Finding:
        self = super().__new__(cls, text)
        self.vrange = vrange
        self.frames = tuple(frames)
        self.chain = tuple(chain)
        self.space = space
        self.info = info
        return self

    def __reduce__(self):
        # A str subclass with attributes: pickled (pytest-xdist, multiprocessing) with its fields, not as bare text.
        return (_rebuild, (str(self), self.vrange, self.frames, self.chain, self.space, self.info))


def _rebuild(text, vrange, frames, chain, space, info) -> Finding:
    return Finding(text, vrange=vrange, frames=frames, chain=chain, space=space, info=info)


def failures(findings: Iterable[str]) -> list[str]:
    """The findings that fail a check: all but the `info` ones."""
    return [f for f in findings if not getattr(f, "info", False)]
