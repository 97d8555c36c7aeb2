"""Continuous batching: which waiting requests join the running batch, and when.

A request waits until it has *arrived* (`arrivals`: seconds after the start of `Engine.generate`, or
with `arrival_unit="step"` the number of engine steps run before it may join) and a row is free (at
most `max_batch` requests run at once; `None`: no limit). Waiting requests join in order of arrival,
ties in input order. They join between steps: the engine prefills a step's joiners in forwards of
their own (one, unless rows × longest prompt exceed `Engine(prefill_tokens=…)`: then in groups, longest
first) and places their rows in the shared cache, into rows that finished requests left
where it can (`SlotCache.place`), and the drafter `start`s them. No arrivals and no `max_batch` is the
fixed batch: every request is prefilled (in groups within the budget) before the first step.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from dspark.core.errors import DSparkError

UNITS = ("s", "step")


@dataclass
class Timing:
    """When one request arrived, joined, emitted its first token and finished. Times are charged
    seconds after the start of `generate` (the oracle's free proposals excluded, like `Stats.wall`)."""

    arrival: float = 0.0        # as given: seconds, or a step index with arrival_unit="step"
    admitted: float = 0.0       # its prefill began
    admitted_step: int = 0      # engine steps run before it joined
    first_token: float = 0.0
    finished: float = 0.0


class Admission:
    """The queue of requests that have not joined yet."""

    def __init__(self, n: int, max_batch: int | None = None, arrivals: list[float] | None = None,
                 unit: str = "s"):
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise DSparkError(f"max_batch must be an integer >= 1 or None (got {max_batch!r})")
        if unit not in UNITS:
            raise DSparkError(f"arrival_unit must be one of {'|'.join(UNITS)} (got {unit!r})")
        if arrivals is not None:
            if len(arrivals) != n:
                raise DSparkError(f"{len(arrivals)} arrival times for {n} prompts: give one per prompt")
            if any(not math.isfinite(a) or a < 0 for a in arrivals):
                raise DSparkError("arrival times must be finite and >= 0")
        self.max_batch, self.unit = max_batch, unit
        self.arrival = [float(a) if unit == "s" else int(a) for a in arrivals] if arrivals is not None else \
            [0.0 if unit == "s" else 0] * n
        self.waiting = deque(sorted(range(n), key=lambda i: (self.arrival[i], i)))

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def _clock(self, seconds: float, step: int):
        return seconds if self.unit == "s" else step

    def take(self, running: int, seconds: float, step: int) -> list[int]:
        """The requests (input indices) that join now, with `running` requests still running."""
        now, out = self._clock(seconds, step), []
        while self.waiting and self.arrival[self.waiting[0]] <= now and (
                self.max_batch is None or running + len(out) < self.max_batch):
            out.append(self.waiting.popleft())
        return out

    def next_arrival(self):
        """When the first waiting request arrives (seconds or step, as given)."""
        return self.arrival[self.waiting[0]]


# A prefill forward's fixed cost in padded token slots: on this CPU (SmolLM2, bf16, 2 threads) a 1×50-token
# prefill costs 121 ms and a 1×100 one 148 ms, ≈ 55 ms + ≈ 0.9 ms per slot, so a forward costs ≈ 64 slots
FORWARD_COST_SLOTS = 64


def prefill_groups(joining: list, budget: int) -> list[list]:
    """Requests (RequestState) joining at once, in groups of one prefill forward each, longest prompt
    first. A group is left-padded to its longest prompt, so the groups are chosen to cost least: the padded
    slots of every group plus FORWARD_COST_SLOTS per forward (one long prompt joining with short ones
    would otherwise make them all as wide as it), each group's rows × longest prompt within `budget`
    tokens (one row at least), so many long prompts joining together never build one huge forward
    (eager attention holds rows × heads × length² scores)."""
    order = sorted(joining, key=lambda s: -len(s.tokens))
    widths = [max(len(s.tokens) - 1, 1) for s in order]
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)     # best[j]: cheapest split of order[:j]
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):                          # group order[i:j], as wide as order[i]
            if i < j - 1 and (j - i) * widths[i] > budget:
                break
            cost = best[i] + FORWARD_COST_SLOTS + (j - i) * widths[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
