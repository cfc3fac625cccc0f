"""Figures as distributions, and the rows of the one table.

Every figure is a `Dist`: raw samples taken after warm-up, summarised as p50, p95 and max (nearest
rank: p95 of 20 samples is the 19th smallest, of 10 or fewer it is the max). A `Row` is one figure of
gpujobd beside the peers or limits measured in the same run; its ratio is gpujobd's p50 over each
peer's p50 (or the statistic the row names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

LOWER = "lower"  # lower is better: latencies, CPU time, memory
HIGHER = "higher"  # higher is better: rates


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Dist:
    """Samples of one measured thing, in `unit`, taken after `warmup` discarded runs."""

    label: str
    unit: str
    samples: List[float]
    warmup: int = 0
    detail: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Dict[str, float]:
        if not self.samples:
            raise ValueError(f"{self.label}: no samples")
        return {
            "runs": len(self.samples),
            "p50": percentile(self.samples, 50),
            "p95": percentile(self.samples, 95),
            "max": max(self.samples),
            "min": min(self.samples),
            "mean": sum(self.samples) / len(self.samples),
        }

    def to_json(self) -> Dict[str, Any]:
        return {"label": self.label, "unit": self.unit, "warmup": self.warmup, **self.summary(),
                "samples": [round(s, 9) for s in self.samples], "detail": self.detail}


@dataclass
class Row:
    """One figure of gpujobd and what it is measured against; `missing` says why it was not measured."""

    section: str
    key: str
    figure: str
    ours: Optional[Dist] = None
    peers: List[Dist] = field(default_factory=list)
    better: str = LOWER
    note: str = ""
    missing: str = ""
    failed: str = ""  # the figure is the time until it failed; what failed
    ratio_of: str = "p50"  # the statistic the ratio compares

    def ratios(self) -> List[Optional[float]]:
        if self.ours is None:
            return [None for _ in self.peers]
        ours = self.ours.summary()[self.ratio_of]
        return [ours / peer.summary()[self.ratio_of] if peer.summary()[self.ratio_of] else None
                for peer in self.peers]

    def to_json(self) -> Dict[str, Any]:
        if self.missing:
            return {"section": self.section, "key": self.key, "figure": self.figure,
                    "status": f"not measured: {self.missing}"}
        assert self.ours is not None
        return {
            "section": self.section, "key": self.key, "figure": self.figure, "better": self.better,
            "note": self.note, "status": f"failed: {self.failed}" if self.failed else "measured",
            "ratio_of": self.ratio_of, "ours": self.ours.to_json(),
            "peers": [peer.to_json() for peer in self.peers],
            "ratios": [None if r is None else round(r, 4) for r in self.ratios()],
        }


class BenchFailure(AssertionError):
    """A correctness check of a benchmark failed (a job lost, recorded twice, a survivor)."""


def check(condition: bool, message: str) -> None:
    """Fail loudly: benchmarks also check what they measure."""
    if not condition:
        raise BenchFailure(message)
