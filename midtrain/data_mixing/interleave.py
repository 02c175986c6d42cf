"""Deterministic interleaving of sources: which source fills each position of the global stream.

With normalised weights ``w_s`` the schedule keeps, for every prefix of ``n`` positions, each
source's count within one sequence of its share: ``|count_s(n) - w_s * n| < 1``. The greedy
"largest deficit" rule (Megatron's blended dataset) breaks that bound with many sources, so this is
a Pfair schedule (Baruah et al.): job ``j`` (1-based) of source ``s`` has the window
``[floor((j-1)/w_s), ceil(j/w_s))`` and each slot goes to the released job with the earliest
deadline, ties to the first source. Weights sum to one, so earliest-deadline-first meets every
deadline, which is exactly the bound above.

Everything is integer arithmetic on exact weights, so the schedule is the same on every machine,
and it is periodic: after ``period`` slots every source has had exactly its ``share`` and the
state repeats, which lets the plan (and ``seek``) jump over whole periods.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from math import lcm


def exact_weights(weights: Sequence[float]) -> list[Fraction]:
    """Normalised weights as exact fractions of the decimals the user wrote (``0.1`` is 1/10)."""
    exact = [Fraction(str(w)) for w in weights]
    if not exact or any(w <= 0 for w in exact):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    total = sum(exact)
    return [w / total for w in exact]


class Interleaver:
    """The Pfair schedule of one stage: ``shares[s] / period`` is source ``s``'s exact weight."""

    def __init__(self, weights: Sequence[Fraction]) -> None:
        if sum(weights) != 1:
            raise ValueError("weights must be normalised (use exact_weights)")
        self.period = lcm(*(w.denominator for w in weights))
        self.shares = [int(w * self.period) for w in weights]

    def advance(self, counts: list[int], steps: int, picks: list[int] | None = None) -> None:
        """Fill the next ``steps`` slots: ``counts`` (sequences per source so far in this stage)
        is updated in place and, when given, each slot's source is appended to ``picks``."""
        shares, period = self.shares, self.period
        t = sum(counts)
        # Release slot and deadline of each source's next job; only the chosen source's change.
        release = [c * period // a for c, a in zip(counts, shares, strict=True)]
        deadline = [-(-(c + 1) * period // a) for c, a in zip(counts, shares, strict=True)]
        sources = range(len(shares))
        for _ in range(steps):
            # Some job is always released: if none were, every count_s > w_s * t, summing to > t.
            best, best_deadline = -1, 0
            for s in sources:
                if release[s] <= t and (best < 0 or deadline[s] < best_deadline):
                    best, best_deadline = s, deadline[s]
            c = counts[best] + 1
            counts[best] = c
            a = shares[best]
            release[best] = c * period // a
            deadline[best] = -(-(c + 1) * period // a)
            t += 1
            if picks is not None:
                picks.append(best)

    def counts_at(self, n: int) -> list[int]:
        """Sequences per source in the first ``n`` slots: whole periods, then the remainder."""
        periods, rest = divmod(n, self.period)
        counts = [periods * a for a in self.shares]
        self.advance(counts, rest)
        return counts
