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

    def draft_rows(self, states) -> list[bool]:
        """Asked before proposing: which requests draft this step (the others only verify their anchor;
        none: a plain step, no drafting cost). Lossless as long as the answer depends only on earlier steps."""
        return [True] * len(states)


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
    reports unless `draft_cost` is given: a running mean per number of drafting rows k (a proposal for
    6 rows costs ~2.5× one for 1), interpolated for a k not seen yet.

    Before proposing (`draft_rows`) it predicts each request's survivals from its latest proposal (or,
    for a request without one in the last `max_age` steps, from the mean over every proposal so far) and
    drafts for the k requests of highest predicted gain, k chosen to maximise the predicted Θ of the
    step with the proposal's cost for k rows (k = 0: a plain step). Under load, where a proposal for
    every row costs more than it can return, only the most confident rows draft. A request that has
    not drafted for `probe_every` steps (or ever) drafts anyway, one such request per step, so that an
    estimate made in another part of the text cannot stop drafting for good."""

    name = "sched"

    def __init__(self, step_cost, unit: str = "position", draft_cost: float | None = None, max_age: int = 4,
                 probe_every: int = 16, packed: bool = True):
        if unit not in ("column", "position"):
            raise ValueError(f"unknown admission unit '{unit}': column | position")
        self.step_cost, self.unit, self.packed = step_cost, unit, packed
        self.fixed_draft = draft_cost
        self.draft_mean: dict[int, RunningMean] = {}   # drafting rows → mean seconds of a proposal
        self.max_age, self.probe_every = max_age, probe_every
        self.latest: dict = {}                         # request → its survivals at its latest proposal
        self.idle: dict = {}                           # request → steps since it last drafted
        self.mean_survival: list[RunningMean] = []     # per block position, over every proposal

    @staticmethod
    def _key(state, i: int):
        return getattr(state, "rid", i)

    def draft_rows(self, states) -> list[bool]:
        """The requests to draft for this step (see the class); depends only on earlier steps, so
        decoding stays lossless."""
        keys = [self._key(s, i) for i, s in enumerate(states)]
        self.idle = {k: self.idle.get(k, self.probe_every - 1) + 1 for k in keys}   # new requests: due a probe
        self.latest = {k: surv for k, surv in self.latest.items() if k in self.idle}
        r = len(states)
        if not self.mean_survival:                     # nothing proposed yet: every row drafts
            return self._drafting(keys, set(range(r)))
        prior = [m.mean for m in self.mean_survival]
        guess = [self.latest[k] if k in self.latest and self.idle[k] <= self.max_age else prior for k in keys]
        order = sorted(range(r), key=lambda i: -sum(guess[i]))   # most expected accepted drafts first
        best, best_k = r / self.step_cost(r, 1), 0     # k = 0: a plain step
        for k in sorted({*range(1, min(r, 8) + 1), *(2 ** e for e in range(3, r.bit_length())), r}):
            chosen = set(order[:k])
            theta = self._plan([g if i in chosen else [] for i, g in enumerate(guess)], rows_drafting=k)[0]
            if theta > best:
                best, best_k = theta, k
        chosen = set(order[:best_k])
        stale = [i for i in range(r) if i not in chosen and self.idle[keys[i]] >= self.probe_every]
        if stale:                                      # probe the longest idle one
            chosen.add(max(stale, key=lambda i: self.idle[keys[i]]))
        return self._drafting(keys, chosen)

    def _drafting(self, keys, chosen: set) -> list[bool]:
        for i in chosen:
            self.idle[keys[i]] = 0
        return [i in chosen for i in range(len(keys))]

    def observe_draft_time(self, seconds: float, rows: int = 1) -> None:
        self.draft_mean.setdefault(rows, RunningMean()).add(seconds)

    def draft_cost(self, r: int) -> float:
        """Expected seconds of one proposal for r requests: interpolated linearly between the sizes
        observed around r, the nearest one's beyond them."""
        if self.fixed_draft is not None:
            return self.fixed_draft
        if not self.draft_mean:
            return 0.0
        lo = max((k for k in self.draft_mean if k <= r), default=None)
        hi = min((k for k in self.draft_mean if k >= r), default=None)
        if lo is None or hi is None or lo == hi:
            return self.draft_mean[hi if lo is None else lo].mean
        c_lo, c_hi = self.draft_mean[lo].mean, self.draft_mean[hi].mean
        return c_lo + (c_hi - c_lo) * (r - lo) / (hi - lo)

    def _theta(self, tau: float, r: int, width: int, tokens: int, drafting: int) -> float:
        """Expected tokens per second of a step: `tokens` verified in r rows, the widest `width`, with a
        proposal for `drafting` rows (0: none)."""
        packed = self.packed and packs(tokens, r, width)   # the engine's own rule
        cost = packed_cost(self.step_cost, r, tokens) if packed else self.step_cost(r, width)
        return tau / (cost + (self.draft_cost(drafting) if drafting else 0.0))

    def choose(self, states, proposals, limits) -> list[int]:
        surv = [survival(p, lim) for p, lim in zip(proposals, limits)]
        for i, (s, sv) in enumerate(zip(states, surv)):
            if sv:                                     # this row drafted: remember what it predicts
                self.latest[self._key(s, i)] = sv
                self.idle[self._key(s, i)] = 0
                self.mean_survival += [RunningMean() for _ in range(len(sv) - len(self.mean_survival))]
                for m, a in zip(self.mean_survival, sv):
                    m.add(a)
        return self._plan(surv, rows_drafting=sum(1 for n in limits if n > 0))[1]

    def _plan(self, surv: list[list[float]], rows_drafting: int = 1) -> tuple[float, list[int]]:
        """(expected Θ, verified drafts per row) of the step, its proposal for `rows_drafting` rows paid."""
        return (self._columns if self.unit == "column" else self._positions)(surv, rows_drafting)

    def _columns(self, surv: list[list[float]], k: int) -> tuple[float, list[int]]:
        r = len(surv)
        tau, width, tokens = float(r), 1, r
        theta = self._theta(tau, r, width, tokens, k)
        for j in range(max((len(s) for s in surv), default=0)):
            have = [s[j] for s in surv if len(s) > j]
            new = self._theta(tau + sum(have), r, j + 2, tokens + len(have), k)
            if not new > theta:
                break
            tau, width, tokens, theta = tau + sum(have), j + 2, tokens + len(have), new
        return theta, [min(len(s), width - 1) for s in surv]

    def _positions(self, surv: list[list[float]], k: int) -> tuple[float, list[int]]:
        r = len(surv)
        order = sorted(((a, j, i) for i, s in enumerate(surv) for j, a in enumerate(s)),
                       key=lambda t: (-t[0], t[1], t[2]))   # ties: earlier position first (prefixes)
        tau, width, tokens, admitted = float(r), 1, r, [0] * r
        theta = self._theta(tau, r, width, tokens, k)
        for a, j, i in order:
            new_width = max(width, j + 2)
            new = self._theta(tau + a, r, new_width, tokens + 1, k)
            if not new > theta:
                break
            tau, width, tokens, theta = tau + a, new_width, tokens + 1, new
            admitted[i] = max(admitted[i], j + 1)   # a_{i,j} never grows with j: admissions form prefixes
        if self.packed:
            return theta, admitted
        return theta, [min(len(s), width - 1) for s in surv]    # fill: slots inside the width are computed anyway


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
