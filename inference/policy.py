"""Verification policies: how many of each request's drafted tokens the target verifies this step.

A policy sees every active request's proposal (tokens, draft distributions, confidences) and the
per-request limits, and returns a prefix length per request, so it can never verify a position
whose predecessor it cut.

Losslessness constrains *what a decision may look at*: whether position k of a request is verified
may depend on that request's confidences c_1..c_k (functions of draft tokens before k) and on
anything about other requests, but never on the request's draft tokens at or after k. Every
policy here keeps that rule (tests/test_scheduler.py checks it).

`ConfidenceScheduler` is the DSpark paper's hardware-aware prefix scheduler (Algorithm 1): with
survival a_{r,j} = Π_{i≤j} c_{r,i}, start with every request verifying only its anchor, admit
candidates in order and keep going while the expected throughput Θ = τ* / step_time improves;
stop at the first non-improvement (the early stop is what keeps it lossless; a global search
over all prefix sets is not). Two admission units:

- `position` (default): one (r, j) at a time in order of decreasing a_{r,j} — the paper's walk, right
  for a runtime whose step cost grows with the number of verified tokens B: ours with packed ragged
  verification (inference/packed.py), costed as cost(R, B);
- `column`: block position j for every request at once, j = 1, 2, ….

With `packed=False` (a runtime that pads every row to the widest) the cost is cost(R, widest row):
a position inside the current width is then free, so after the walk `position` fills each row up to
the chosen width; the fill depends only on admitted positions, so it keeps the rule above.
"""
from __future__ import annotations

import re

from .packed import packs
from .profile import packed_cost


class Policy:
    name = "policy"

    def choose(self, states, proposals, limits) -> list[int]:
        raise NotImplementedError

    def observe_draft_time(self, seconds: float, rows: int = 1) -> None:
        """The runtime reports each step's proposal time for `rows` requests (used by cost-aware policies)."""

    def wants_draft(self, states) -> bool:
        """Asked before proposing: False makes this a plain step (no drafting cost). Lossless as long
        as the answer depends only on earlier steps."""
        return True


class VerifyAll(Policy):
    """Verify every drafted token (up to the per-request limit)."""

    name = "all"

    def choose(self, states, proposals, limits) -> list[int]:
        return [min(len(p.tokens), lim) for p, lim in zip(proposals, limits)]


class FixedLength(Policy):
    """Verify at most n drafted tokens per step (n = 1: like MTP-1, one drafted token always)."""

    def __init__(self, n: int = 1):
        if n < 0:
            raise ValueError("FixedLength needs n >= 0")
        self.n, self.name = n, f"gamma{n}"

    def choose(self, states, proposals, limits) -> list[int]:
        return [min(len(p.tokens), lim, self.n) for p, lim in zip(proposals, limits)]


def survival(proposal, limit: int) -> list[float]:
    """a_j = Π_{i≤j} c_i over the first `limit` drafted positions (needs confidences)."""
    conf = proposal.confidences
    n = min(len(proposal.tokens), limit)
    if n and conf is None:
        raise ValueError("this policy needs a drafter that reports confidences (a trained DSpark/DFlash head)")
    out, a = [], 1.0
    for c in conf[:n] if n else []:
        a *= min(max(float(c), 0.0), 1.0)
        out.append(a)
    return out


class StaticThreshold(Policy):
    """Verify the prefix whose cumulative survival a_j stays >= threshold (load-blind)."""

    def __init__(self, threshold: float = 0.5):
        if not 0 <= threshold <= 1:
            raise ValueError("threshold must lie in [0, 1]")
        self.threshold, self.name = threshold, "threshold"

    def choose(self, states, proposals, limits) -> list[int]:
        return [sum(1 for a in survival(p, lim) if a >= self.threshold) for p, lim in zip(proposals, limits)]


class RunningMean:
    """The mean of the values added so far (0 before any)."""

    def __init__(self):
        self.mean, self.n = 0.0, 0

    def add(self, x: float) -> None:
        self.n += 1
        self.mean += (x - self.mean) / self.n


class ConfidenceScheduler(Policy):
    """Hardware-aware prefix scheduler. `step_cost(R, T)` → seconds of one verification step with R
    rows of width T (anchor + drafts); the drafter's per-step time is added from the runtime's
    reports unless `draft_cost` is given: a running mean per number of rows R (a proposal for 6 rows
    costs ~2.5× one for 1), the nearest R observed standing in for an R not seen yet."""

    name = "sched"

    def __init__(self, step_cost, unit: str = "position", draft_cost: float | None = None, max_skip: int = 16,
                 packed: bool = True):
        if unit not in ("column", "position"):
            raise ValueError(f"unknown admission unit '{unit}': column | position")
        self.step_cost, self.unit, self.packed = step_cost, unit, packed
        self.fixed_draft = draft_cost
        self.draft_mean: dict[int, RunningMean] = {}   # rows → mean seconds of a proposal
        self.max_skip, self.misses, self.skip = max_skip, 0, 0

    def wants_draft(self, states) -> bool:
        """Back off from drafting while it does not pay: when the best plan of a step (drafting cost
        included) was slower than a plain step, skip drafting for the next 1, 2, 4, … (≤ max_skip)
        steps, then probe again. Depends only on past steps, so it keeps decoding lossless."""
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def _account(self, theta: float, r: int) -> None:
        if theta < r / self.step_cost(r, 1):          # a plain step would have been faster
            self.misses += 1
            self.skip = min(2 ** (self.misses - 1), self.max_skip)
        else:
            self.misses = 0

    def observe_draft_time(self, seconds: float, rows: int = 1) -> None:
        self.draft_mean.setdefault(rows, RunningMean()).add(seconds)

    def draft_cost(self, r: int) -> float:
        """Expected seconds of one proposal for r requests."""
        if self.fixed_draft is not None:
            return self.fixed_draft
        if not self.draft_mean:
            return 0.0
        return self.draft_mean[min(self.draft_mean, key=lambda seen: (abs(seen - r), -seen))].mean

    def _theta(self, tau: float, r: int, width: int, tokens: int) -> float:
        """Expected tokens per second of a step: `tokens` verified in r rows, the widest `width`."""
        packed = self.packed and packs(tokens, r, width)   # the engine's own rule
        cost = packed_cost(self.step_cost, r, tokens) if packed else self.step_cost(r, width)
        return tau / (cost + self.draft_cost(r))

    def choose(self, states, proposals, limits) -> list[int]:
        surv = [survival(p, lim) for p, lim in zip(proposals, limits)]
        return (self._columns if self.unit == "column" else self._positions)(surv)

    def _columns(self, surv: list[list[float]]) -> list[int]:
        r = len(surv)
        tau, width, tokens = float(r), 1, r
        theta = self._theta(tau, r, width, tokens)
        for j in range(max((len(s) for s in surv), default=0)):
            have = [s[j] for s in surv if len(s) > j]
            new = self._theta(tau + sum(have), r, j + 2, tokens + len(have))
            if not new > theta:
                break
            tau, width, tokens, theta = tau + sum(have), j + 2, tokens + len(have), new
        self._account(theta, r)
        return [min(len(s), width - 1) for s in surv]

    def _positions(self, surv: list[list[float]]) -> list[int]:
        r = len(surv)
        order = sorted(((a, j, i) for i, s in enumerate(surv) for j, a in enumerate(s)),
                       key=lambda t: (-t[0], t[1], t[2]))   # ties: earlier position first (prefixes)
        tau, width, tokens, admitted = float(r), 1, r, [0] * r
        theta = self._theta(tau, r, width, tokens)
        for a, j, i in order:
            new_width = max(width, j + 2)
            new = self._theta(tau + a, r, new_width, tokens + 1)
            if not new > theta:
                break
            tau, width, tokens, theta = tau + a, new_width, tokens + 1, new
            admitted[i] = max(admitted[i], j + 1)   # a_{i,j} never grows with j: admissions form prefixes
        self._account(theta, r)
        if self.packed:
            return admitted
        return [min(len(s), width - 1) for s in surv]    # fill: slots inside the width are computed anyway


POLICIES = "all|sched|threshold|gamma<N> (N >= 1)"


def parse_policy(name) -> tuple[str, int | None]:
    """A policy name → (kind, N): `all`, `sched`, `threshold` (N None) or `gamma<N>` → ("gamma", N),
    at most N >= 1 drafted tokens verified (gamma1: like MTP-1). The one check of the names: the
    settings check (cli/settings.py) and `make_policy` both ask it. ValueError for anything else."""
    if name in ("all", "sched", "threshold"):
        return name, None
    m = re.fullmatch(r"gamma([0-9]+)", name) if isinstance(name, str) else None
    if m and int(m.group(1)) >= 1:
        return "gamma", int(m.group(1))
    raise ValueError(f"unknown policy {name!r}: {POLICIES}")


def make_policy(name: str, step_cost=None, threshold: float = 0.5, unit: str = "position",
                packed: bool = True) -> Policy:
    """The policy `name` names (see `parse_policy`); `sched` needs `step_cost`."""
    kind, n = parse_policy(name)
    if kind == "all":
        return VerifyAll()
    if kind == "sched":
        if step_cost is None:
            raise ValueError("the scheduler needs a step-cost profile")
        return ConfidenceScheduler(step_cost, unit=unit, packed=packed)
    if kind == "threshold":
        return StaticThreshold(threshold)
    return FixedLength(n)
