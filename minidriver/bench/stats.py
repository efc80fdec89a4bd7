"""The benchmarks' statistics: min / median / max, per-pair ratios, alternation (pure).

Two things compared run in alternation (A B, then B A) and are compared by the ratio
of each pair, median over the pairs: both halves of a ratio saw the same machine,
which other people's work shares. (No Nova counterpart: tooling.)
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class Stat:
    """min / median / max of ``n`` samples."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no samples")
        return cls(min(values), statistics.median(values), max(values), len(values))

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def summarize(samples: Sequence[Mapping[str, float]], columns: Sequence[str]) -> dict[str, Any]:
    """Each column's min / median / max over the samples (as JSON-ready dicts)."""
    return {col: Stat.of([s[col] for s in samples]).as_dict() for col in columns}


def pair_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each pair (same index: measured next to each other)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators for {len(denominators)} denominators")
    if any(d <= 0 for d in denominators):
        raise ValueError("a denominator is not positive")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def ratio_stat(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Per-pair ratios, summarised: the median is the median of the ratios."""
    return Stat.of(pair_ratios(numerators, denominators)).as_dict()


def alternate(
    runs: int, first: Callable[[int], A], second: Callable[[int], B]
) -> tuple[list[A], list[B]]:
    """``runs`` pairs, run A B, B A, A B...: neither side always goes first."""
    a: list[A] = []
    b: list[B] = []
    for i in range(runs):
        if i % 2 == 0:
            a.append(first(i))
            b.append(second(i))
        else:
            b.append(second(i))
            a.append(first(i))
    return a, b


def in_turn(items: Sequence[A], i: int) -> list[A]:
    """``items`` in order on even rounds, reversed on odd ones."""
    return list(items) if i % 2 == 0 else list(reversed(items))
