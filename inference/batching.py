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


def prefill_groups(joining: list, budget: int) -> list[list]:
    """Requests (RequestState) joining at once, in groups of one prefill forward each, longest prompt
    first: a group's rows × its longest prompt stay within `budget` tokens (one row at least), so many
    long prompts joining together never build one huge forward (eager attention holds rows × heads ×
    length² scores)."""
    groups, width = [], 0
    for s in sorted(joining, key=lambda s: -len(s.tokens)):
        if groups and (len(groups[-1]) + 1) * width <= budget:
            groups[-1].append(s)
        else:
            groups.append([s])
            width = len(s.tokens) - 1
    return groups
