"""`kgen test --shard K/N`: share K of N of the checks, so a CI matrix spreads one run over N machines.

The checks are ordered by pytest node id (`test_invariants.py::test_x[tcg]`: file, function, parameters, so also
the kernel or config a parametrised check runs on) and cut into N runs of consecutive ids, sizes differing by at
most one. Every machine collects the same checks, so the N shares are disjoint and together hold every check once,
whatever order pytest or a plugin puts them in; consecutive ids keep a module's checks (and the machine it boots
for them) mostly on one machine. The share is taken after -k, so the N machines split what -k selected.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ShardError(ValueError):
    """A --shard value that is not K/N with 1 <= K <= N."""


@dataclass(frozen=True)
class Shard:
    index: int      # K, from 1
    count: int      # N

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, slash, count = text.partition("/")
        if not slash or not all(part.isdigit() and part.isascii() for part in (index, count)):
            raise ShardError(f"{text!r} is not K/N (this machine's share K of N, as 2/3)")
        shard = cls(int(index), int(count))
        if shard.count < 1 or not 1 <= shard.index <= shard.count:
            raise ShardError(f"{text!r}: K/N needs 1 <= K <= N (shares are numbered 1 to N)")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, node_ids: Sequence[str]) -> set[str]:
        """The ids of this share: the K-th of N runs of consecutive ids in sorted order."""
        ordered = sorted(set(node_ids))
        start = (self.index - 1) * len(ordered) // self.count
        end = self.index * len(ordered) // self.count
        return set(ordered[start:end])
