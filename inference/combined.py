"""A trained head combined with n-gram prompt lookup: per request and step, one of the two proposes.

Copying is common (code repeats names, signatures, whole lines), and there the free lookup beats a
small trained head (SmolLM2 HumanEval: prompt lookup τ ≈ 1.46 vs the head's 1.29). `CombinedDrafter`
keeps both and picks, for each request at each step, ONE source for the whole block:

**Source rule.** The lookup proposes when it has a match whose n-gram is at least `min_match` tokens
long *and* its step yields at least as many tokens per second as the head's would:
1 + E_lookup ≥ (1 + E_head) / (1 + c). E is a running expected accepted length (Σ_j Π_{i≤j} ĉ_i over
the position rates below: over the lookup's continuation for its match length, over the request's
limit for the head), and c is the head's proposal time as a fraction of the rest of a step (the
lookup's dict probe costs nothing): a head barely more accurate than the lookup is not worth its
proposal. c is measured as the run goes (running means of the head's proposal time and of the time
from a proposal to the next `update`: verification and the head's context update), or fixed with
`head_cost=`. When a request already takes the head in a step, the others' head proposals ride along
in the same pass, so they are decided again with c = 0. Every input is a function of the request's
context, of earlier steps and of timings, never of this step's draft tokens, so the choice cannot bias
the output (a rule such as "lookup when its first token agrees with the head's sampled first token"
would select on the head's own sample: its reported q would no longer be the distribution the block
was drawn from, and the confidence of position 1 would depend on the token at position 1 —
docs/design.md §5). When no request takes the head, its backbone pass is skipped (the
lookup costs a dict probe).

**Confidences of lookup blocks.** ĉ_{n,k} = (accepts + prior·w) / (attempts + w): the running rate at
which a position-k lookup draft with an n-gram match of length n survived, given that positions
1 … k−1 did (Beta prior mean `prior`, weight `prior_weight`). The outcome of position k is read from
what the target emitted, so it is known even where the policy cut the block: position k survives iff
the target's token at that position equals the draft (greedy: the argmax; sampling: a point-mass draft
x is accepted with probability p(x), a target sample equals x with probability p(x), and a rejected
one is redrawn from the residual, which has no mass at x). The head's own blocks carry the head's
(calibrated) confidences, so the confidence scheduler and the threshold policy work on mixed batches.
The head's source rate ĥ_k is estimated the same way from its own blocks (for the source rule only).

**Lossless mixing.** A lookup block is a point mass (`probs=None`), a head block carries its draft
distribution; the engine verifies every request with its own proposal (`verify_sampled` per request,
q None or a tensor), so mixing per request keeps each request exact. The head's per-request state
(its context keys/values) is updated from the target's features on *every* step, whichever source
proposed: `update` and `start` always go to the head.
"""
from __future__ import annotations

import time

from .drafters import Drafter, PromptLookupDrafter, Proposal
from .policy import RunningMean


class NgramLookup(PromptLookupDrafter):
    """Prompt lookup that also reports the length of the n-gram it matched (0: no match)."""

    def match(self, s, limit: int) -> tuple[int, list[int]]:
        idx, toks = self._refresh(s), s.tokens
        if limit > 0:
            for n in range(self.max_ngram, self.min_ngram - 1, -1):
                start = idx[n].get(tuple(toks[-n:])) if len(toks) > n else None
                if start is not None:
                    found = toks[start:start + limit]
                    if found:
                        return n, found
        return 0, []


class RunningRates:
    """Per key and block position: attempts and survivals, and the smoothed conditional rate."""

    def __init__(self, prior: float, weight: float):
        self.prior, self.weight = prior, weight
        self.tries: dict = {}
        self.wins: dict = {}

    def rate(self, key, k: int) -> float:
        n = self.tries.get((key, k), 0)
        return (self.wins.get((key, k), 0) + self.prior * self.weight) / (n + self.weight)

    def rates(self, key, n: int) -> list[float]:
        return [self.rate(key, k) for k in range(n)]

    def expected(self, key, n: int) -> float:
        """Expected accepted drafts of an n-token block: Σ_j Π_{i≤j} rate_i."""
        total, a = 0.0, 1.0
        for c in self.rates(key, n):
            a *= c
            total += a
        return total

    def observe(self, key, drafts: list[int], emitted: list[int]) -> None:
        """Position k survives iff the target emitted the draft there; stop after the first failure (or
        where the emitted tokens end: EOS or the length limit)."""
        for k, (d, e) in enumerate(zip(drafts, emitted)):
            self.tries[(key, k)] = self.tries.get((key, k), 0) + 1
            if d != e:
                return
            self.wins[(key, k)] = self.wins.get((key, k), 0) + 1


class CombinedDrafter(Drafter):
    """`head`: a trained head's runtime drafter (a `HeadDrafter`); the lookup is built here. See the
    module docstring for the source rule and the confidences. `counts` tallies blocks per source."""

    charged = True

    def __init__(self, head: Drafter, max_ngram: int = 3, min_ngram: int = 1, min_match: int = 1,
                 prior: float = 0.5, prior_weight: float = 2.0, head_cost: float | None = None):
        if min_match < 1:
            raise ValueError("min_match must be >= 1")
        if not 0 < prior < 1 or prior_weight <= 0:
            raise ValueError("the confidence prior needs 0 < prior < 1 and prior_weight > 0")
        if head_cost is not None and head_cost < 0:
            raise ValueError("head_cost must be >= 0 (a fraction of a step) or None (measured)")
        self.fixed_cost = head_cost
        self.head_time = RunningMean()    # seconds of a head proposal
        self.rest_time = RunningMean()    # seconds from a proposal to the next update
        self._proposed_at: float | None = None
        self.head = head
        self.lookup = NgramLookup(max_ngram, min_ngram)
        self.min_match = min_match
        self.name = f"{head.name}+lookup"
        self.feature_layers = head.feature_layers
        self.lookup_rates = RunningRates(prior, prior_weight)   # key: matched n-gram length
        self.head_rates = RunningRates(prior, prior_weight)     # key: "head"
        self.pending: dict[int, tuple] = {}                      # rid → (source key, drafts, length before)
        self.counts = {"lookup": 0, "head": 0}

    def start(self, states, features):
        self.head.start(states, features)

    def head_cost(self) -> float:
        """The head's proposal time as a fraction of the rest of a step (0 until both are measured)."""
        if self.fixed_cost is not None:
            return self.fixed_cost
        if not (self.head_time.n and self.rest_time.n and self.rest_time.mean > 0):
            return 0.0
        return self.head_time.mean / self.rest_time.mean

    def _use_lookup(self, n: int, found: int, limit: int, cost: float) -> bool:
        if n < self.min_match:
            return False
        return 1 + self.lookup_rates.expected(n, found) >= (1 + self.head_rates.expected("head", limit)) / (1 + cost)

    def propose(self, states, limits):
        out = [Proposal(tokens=[]) for _ in states]
        matches = [self.lookup.match(s, limit) for s, limit in zip(states, limits)]
        cost = self.head_cost()
        takes_lookup = [bool(found) and self._use_lookup(n, len(found), limit, cost)
                        for (n, found), limit in zip(matches, limits)]
        if cost > 0 and not all(takes_lookup) and any(takes_lookup):   # the head runs anyway: no cost to ride along
            takes_lookup = [bool(found) and self._use_lookup(n, len(found), limit, 0.0)
                            for (n, found), limit in zip(matches, limits)]
        head_limits = [0] * len(states)
        for i, (s, limit) in enumerate(zip(states, limits)):
            n, found = matches[i]
            if takes_lookup[i]:
                out[i] = Proposal(tokens=found, probs=None, confidences=self.lookup_rates.rates(n, len(found)))
                self.pending[s.rid] = (n, found, len(s.tokens))
                self.counts["lookup"] += 1
            else:
                head_limits[i] = limit
        if any(head_limits):
            t = time.perf_counter()
            props = self.head.propose(states, head_limits)
            self.head_time.add(time.perf_counter() - t)
            for i, (s, p) in enumerate(zip(states, props)):
                if head_limits[i] > 0:
                    out[i] = p
                    if p.tokens:
                        self.pending[s.rid] = ("head", list(p.tokens), len(s.tokens))
                        self.counts["head"] += 1
        self._proposed_at = time.perf_counter()
        return out

    def update(self, states, accepted, features):
        rest_start, self._proposed_at = self._proposed_at, None   # verification and this update: any step's cost
        for s in states:
            got = self.pending.pop(s.rid, None)
            if got is None:
                continue
            key, drafts, before = got
            rates = self.head_rates if key == "head" else self.lookup_rates
            rates.observe(key, drafts, s.tokens[before:])
        self.head.update(states, accepted, features)   # the head's context grows on every step
        if rest_start is not None:
            self.rest_time.add(time.perf_counter() - rest_start)

    def finish(self, state):
        self.pending.pop(state.rid, None)
        self.lookup.finish(state)
        self.head.finish(state)
