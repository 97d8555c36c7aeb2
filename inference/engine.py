"""The runtime: batched, lossless speculative decoding over one KV cache.

R requests run in one batch. Each step, for every request, the target verifies its anchor plus
ℓ_r drafted tokens (ℓ_r chosen by the verification policy, may differ per request) in ONE forward
pass; rejected slots become holes in the shared cache (see `cache.py` for the layout and its cost
model). Plain decoding is the same engine with no drafter (ℓ_r = 0), so every speedup compares like
with like. Prefill covers each prompt but its last token, which becomes the first anchor.

Continuous batching (`max_batch`, `arrivals`; batching.py): a request that is waiting joins the
running batch between steps, as soon as it has arrived and a row is free; finished rows are reused.
Everything a request's output depends on is its own (its cache row, its drafter state keyed by `rid`,
its own generator when seeds are given per request), so the output does not depend on what it ran with.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dspark.core.errors import DSparkError
from dspark.models.attention import groupable
from dspark.models.target import layer_features

from .batching import Admission, Timing, prefill_groups
from .cache import SlotCache
from .packed import Packing, packed_forward, packs
from .drafters import Drafter, Proposal, RequestState
from .policy import VerifyAll
from .verify import target_probs, verify_greedy, verify_sampled


@dataclass
class Stats:
    """Counters of one `generate` call; `summary()` turns them into the reported metrics."""

    gamma: int
    requests: int = 0
    tokens: int = 0
    request_steps: int = 0          # Σ_r forwards request r took part in
    forwards: int = 0               # batched target forward passes (prefill excluded)
    drafted: int = 0                # drafted tokens sent to verification
    accepted: int = 0
    attempts: list = field(default_factory=list)   # per position: verified with all earlier accepted
    accepts: list = field(default_factory=list)
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_prefill: float = 0.0
    t_uncharged: float = 0.0        # proposal time of a drafter that is not charged (oracle)
    wall: float = 0.0
    per_user_tps: list = field(default_factory=list)   # per request: tokens / (finish − admission)
    blocks: list = field(default_factory=list)     # (confidences, verified, accepted) per request-step, if recorded

    def __post_init__(self):
        self.attempts = [0] * max(self.gamma, 1)
        self.accepts = [0] * max(self.gamma, 1)

    def absorb(self, other: "Stats") -> None:
        """Add another batch's counters (a method run over several batches of R requests)."""
        for name in ("requests", "tokens", "request_steps", "forwards", "drafted", "accepted", "t_draft",
                     "t_verify", "t_prefill", "t_uncharged", "wall"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.attempts = [a + b for a, b in zip(self.attempts, other.attempts)]
        self.accepts = [a + b for a, b in zip(self.accepts, other.accepts)]
        self.per_user_tps = self.per_user_tps + other.per_user_tps
        self.blocks = self.blocks + other.blocks

    def summary(self) -> dict:
        charged = max(self.wall - self.t_uncharged, 1e-9)
        return {
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / charged,
            "decode_tokens_per_s": self.tokens / max(charged - self.t_prefill, 1e-9),
            "per_user_tokens_per_s": sum(self.per_user_tps) / max(len(self.per_user_tps), 1),
            "tau": self.tokens / max(self.request_steps, 1),
            "target_forwards": self.forwards,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "acceptance_by_position": [a / n if n else 0.0 for a, n in zip(self.accepts, self.attempts)],
            "verified_per_step": (self.request_steps + self.drafted) / max(self.forwards, 1),
            "time_s": {"wall": charged, "prefill": self.t_prefill, "draft": self.t_draft - self.t_uncharged,
                       "verify": self.t_verify,
                       "other": max(charged - self.t_prefill - (self.t_draft - self.t_uncharged)
                                    - self.t_verify, 0.0)},
        }


@dataclass
class Result:
    outputs: list[list[int]]        # generated tokens per request, in input order
    states: list[RequestState]
    stats: Stats
    timings: list[Timing] = field(default_factory=list)   # per request, in input order

    @property
    def finish_reasons(self) -> list[str]:
        return [s.finish_reason for s in self.states]

    def summary(self) -> dict:
        return self.stats.summary()


class Engine:
    """Speculative (or plain, with `drafter=None`) decoding of a batch of requests on a target."""

    def __init__(self, target, drafter: Drafter | None = None, policy=None, gamma: int = 7,
                 temperature: float = 0.0, top_p: float = 1.0, compact_fraction: float = 0.2,
                 record_margins: bool = False, record_logits: bool = False, record_blocks: bool = False,
                 top_k: int = 0, prefill_tokens: int = 16384, packed: bool = True):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise DSparkError(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0 (got {temperature}, {top_p}, "
                              f"{top_k})")
        self.target, self.drafter = target, drafter
        self.policy = policy or VerifyAll()
        self.gamma = gamma if drafter is not None else 0
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.compact_fraction = compact_fraction
        self.record_margins, self.record_logits = record_margins, record_logits
        self.record_blocks = record_blocks
        self.prefill_tokens = prefill_tokens   # rows × longest prompt per prefill forward: bounds its memory
        # ragged steps run only their admitted tokens (inference/packed.py), where the target's attention allows
        self.packed = packed and groupable(target.model)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], seed: int | list[int] = 0,
                 eos_token_ids: list[int] | None = None, max_batch: int | None = None,
                 arrivals: list[float] | None = None, arrival_unit: str = "s",
                 on_finish: Callable[[int, RequestState], None] | None = None) -> Result:
        """Decode every prompt; results come back in input order.

        `seed`: one int seeds one generator the batch shares; a list gives each request its own, so a
        sampled row depends on its own seed only, whatever batch it runs in (and whenever it joins).
        `max_batch`: at most this many requests run at once, a waiting one joining as soon as one
        finishes (continuous batching); None runs them all at once. `arrivals`: per request, when it
        may join — seconds after the start (`arrival_unit="s"`; the engine idles until then if nothing
        runs) or a number of engine steps (`"step"`). `on_finish(i, state)` is called as request i
        finishes. Per-user speed counts from a request's admission; `Result.timings` has the rest."""
        if not prompts:
            raise DSparkError("empty prompt set: give at least one prompt")
        if isinstance(seed, (list, tuple)) and len(seed) != len(prompts):
            raise DSparkError(f"{len(seed)} seeds for {len(prompts)} prompts: give one seed per prompt")
        maxes = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        ctx = self.target.max_context
        for i, (p, m) in enumerate(zip(prompts, maxes)):
            if not p:
                raise DSparkError(f"prompt {i} is empty after tokenisation")
            if len(p) + m > ctx:
                raise DSparkError(
                    f"prompt {i} has {len(p)} tokens + max_new_tokens {m} > the target's context {ctx}: "
                    "shorten the prompt or lower max_new_tokens")
        self.eos = set(self.target.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.device = self.target.device
        if isinstance(seed, (list, tuple)):   # request i samples with gens[i]
            self.gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
        else:                                 # one generator the whole batch shares
            self.gens = [torch.Generator(device="cpu").manual_seed(seed)] * len(prompts)
        queue = Admission(len(prompts), max_batch, arrivals, arrival_unit)
        stats = Stats(gamma=max(self.gamma, 1), requests=len(prompts))
        states = [RequestState(rid=i, tokens=list(p), n_prompt=len(p), max_new_tokens=m)
                  for i, (p, m) in enumerate(zip(prompts, maxes))]
        self.timings = [Timing(arrival=a) for a in queue.arrival]
        self.on_finish, self.steps = on_finish, 0
        self.t0 = time.perf_counter()
        cache, active = SlotCache(), []
        while True:
            cache, active = self._reschedule(states, active, cache, queue, stats)
            if active:
                self._step(active, cache, stats)
                self.steps += 1
            elif not queue:
                break
            elif queue.unit == "s":   # nothing runs and the next request has not arrived: idle until it does
                time.sleep(max(queue.next_arrival() - self._now(stats), 0.0))
            else:
                self.steps = max(self.steps, queue.next_arrival())
        stats.wall = time.perf_counter() - self.t0
        stats.per_user_tps = [len(s.generated) / max(t.finished - t.admitted, 1e-9)
                              for s, t in zip(states, self.timings)]
        return Result(outputs=[s.generated for s in states], states=states, stats=stats, timings=self.timings)

    # ------------------------------------------------------------------ internals
    def _features(self, out) -> torch.Tensor | None:
        layers = self.drafter.feature_layers if self.drafter is not None else ()
        if not layers:
            return None
        return layer_features(out.hidden_states, layers)

    def _now(self, stats: Stats) -> float:
        """Charged seconds since the start of `generate`."""
        return time.perf_counter() - self.t0 - stats.t_uncharged

    def _prefill(self, states, cache: SlotCache, stats: Stats) -> None:
        """Prefill `states` into the empty `cache` (one forward, left padded) and start the drafter."""
        t = time.perf_counter()
        lens = [len(s.tokens) - 1 for s in states]
        width = max(lens)
        r = len(states)
        ids = torch.zeros(r, max(width, 1), dtype=torch.long)
        valid = torch.zeros(r, max(width, 1), dtype=torch.bool)
        for i, (s, n) in enumerate(zip(states, lens)):
            if n:
                ids[i, width - n:] = torch.tensor(s.tokens[:-1])
                valid[i, width - n:] = True
        feats = None
        if width:
            pos = (valid.long().cumsum(1) - 1).clamp_min(0)
            ids, valid, pos = ids.to(self.device), valid.to(self.device), pos.to(self.device)
            out = self.target.cached_forward(ids, valid.long(), pos, cache, self._wants_hidden(), logits_to_keep=1)
            cache.append_valid(valid)
            f = self._features(out)
            if f is not None:
                feats = [f[i, width - n:] for i, n in enumerate(lens)]
        else:
            cache.valid = torch.zeros(r, 0, dtype=torch.bool, device=self.device)
        stats.t_prefill += time.perf_counter() - t
        if self.drafter is not None:
            self.drafter.start(states, feats)

    def _wants_hidden(self) -> bool:
        return self.drafter is not None and bool(self.drafter.feature_layers)

    def _propose(self, active, stats: Stats) -> list[Proposal]:
        drafting = [] if self.drafter is None else self.policy.draft_rows(active)
        limits = [max(0, min(self.gamma, s.remaining - 1)) if d else 0 for s, d in zip(active, drafting)]
        if not any(limits):
            return [Proposal(tokens=[]) for _ in active]
        t = time.perf_counter()
        props = self.drafter.propose(active, limits)
        self.policy.observe_draft_time(time.perf_counter() - t, sum(1 for n in limits if n))
        lengths = self.policy.choose(active, props, limits)
        props = [Proposal(p.tokens[:n], None if p.probs is None else p.probs[:n],
                          None if p.confidences is None else p.confidences[:n])
                 for p, n in zip(props, lengths)]
        self._charge_draft(stats, time.perf_counter() - t)
        return props

    def _charge_draft(self, stats: Stats, dt: float) -> None:
        stats.t_draft += dt
        if not self.drafter.charged:
            stats.t_uncharged += dt

    def _step(self, active: list[RequestState], cache: SlotCache, stats: Stats) -> None:
        props = self._propose(active, stats)
        t = time.perf_counter()
        r = len(active)
        lengths = torch.tensor([len(p.tokens) for p in props])
        width = 1 + int(lengths.max())
        ids = torch.zeros(r, width, dtype=torch.long)
        for i, (s, p) in enumerate(zip(active, props)):
            ids[i, 0] = s.tokens[-1]
            if p.tokens:
                ids[i, 1:1 + len(p.tokens)] = torch.tensor(p.tokens)
        base = torch.tensor([len(s.tokens) - 1 for s in active])
        offs = torch.arange(width)
        pos = base[:, None] + offs[None, :]
        new_valid = offs[None, :] <= lengths[:, None]
        ids, pos, new_valid = ids.to(self.device), pos.to(self.device), new_valid.to(self.device)
        sizes = (lengths + 1).tolist()
        # ragged: run B = Σ sizes tokens, not r × width (packing's own cost is ~3 ms: worth it below ¾ full)
        if self.packed and cache.num_slots and packs(sum(sizes), r, width):
            layers = tuple(self.drafter.feature_layers) if self._wants_hidden() else ()
            out = packed_forward(self.target, ids, cache.valid, new_valid, pos, cache, layers,
                                 Packing.of(sizes, width, self.device))
        else:
            out = self.target.cached_forward(ids, cache.attention_mask(new_valid), pos, cache, self._wants_hidden())
        cache.append_valid(new_valid)
        logits = out.logits
        stats.t_verify += time.perf_counter() - t
        stats.forwards += 1

        n_acc, extra = self._verify(logits, ids, lengths, props, active)
        # slots rejected in every row are dropped (at R=1: all of them, so no holes); the rest become holes
        cut = width - 1 - int(n_acc.max())
        if cut:
            cache.truncate(cut)
        keep_slots = offs[None, :width - cut] <= n_acc[:, None]
        cache.set_valid_tail(keep_slots.to(self.device))
        feats = self._features(out)
        now = self._now(stats)
        accepted = n_acc.tolist()
        for i, s in enumerate(active):
            k, ln = accepted[i], len(props[i].tokens)
            stats.drafted += ln
            stats.accepted += k
            if self.record_blocks and props[i].confidences is not None:
                stats.blocks.append((props[i].confidences, ln, k))
            for j in range(min(k + 1, ln)):
                stats.attempts[j] += 1
                stats.accepts[j] += j < k
            new = props[i].tokens[:k] + [extra[i]]
            self._record(s, logits[i], new)
            stats.request_steps += 1
            if len(s.tokens) == s.n_prompt:
                self.timings[s.rid].first_token = now
            self._append(s, new, now)
        stats.tokens += sum(len(s.generated) for s in active if s.done)
        if self.drafter is not None:   # the drafter's own bookkeeping is drafting time
            t = time.perf_counter()
            self.drafter.update(active, accepted, None if feats is None else
                                [feats[i, :k + 1] for i, k in enumerate(accepted)])
            self._charge_draft(stats, time.perf_counter() - t)

    def _verify(self, logits, ids, lengths, props, active):
        if self.temperature == 0:
            n_acc, best = verify_greedy(logits, ids[:, 1:], lengths.to(logits.device))
            extra = best.gather(1, n_acc[:, None])[:, 0].tolist()
            return n_acc.cpu(), extra
        n_acc, extra = [], []
        for i, p in enumerate(props):
            probs = target_probs(logits[i, :len(p.tokens) + 1], self.temperature, self.top_p, self.top_k)
            q = None if p.probs is None else p.probs.to(probs.device, torch.float32)
            k, tok = verify_sampled(probs, p.tokens, q, self.gens[active[i].rid])
            n_acc.append(k)
            extra.append(tok)
        return torch.tensor(n_acc), extra

    def _record(self, s: RequestState, row_logits: torch.Tensor, new: list[int]) -> None:
        if not (self.record_margins or self.record_logits):
            return
        rows = row_logits[:len(new)].float()
        if self.record_logits:
            s.logits.extend(rows.cpu())
        if self.record_margins:
            top2 = rows.topk(2, dim=-1).values
            s.margins.extend((top2[:, 0] - top2[:, 1]).tolist())

    def _append(self, s: RequestState, new: list[int], now: float) -> None:
        for j, tok in enumerate(new):
            if tok in self.eos:
                new = new[:j + 1]
                s.finish_reason = "eos"
                break
        s.tokens.extend(new)
        if len(s.logits) > len(s.generated):
            del s.logits[len(s.generated):]
        if len(s.margins) > len(s.generated):
            del s.margins[len(s.generated):]
        if s.finish_reason or s.remaining <= 0:
            s.done, s.finish_reason = True, s.finish_reason or "length"
            self.timings[s.rid].finished = now

    def _reschedule(self, states, active: list[RequestState], cache: SlotCache, queue: Admission,
                    stats: Stats) -> tuple[SlotCache, list[RequestState]]:
        """Between steps: finished requests leave, waiting ones that have arrived join (into the rows
        the finished left, then as new rows), rows nobody takes are dropped, and the cache is
        compacted when enough of it can go. Returns the cache and its rows' requests."""
        done = [i for i, s in enumerate(active) if s.done]
        for i in done:
            if self.drafter is not None:
                self.drafter.finish(active[i])
            if self.on_finish is not None:
                self.on_finish(active[i].rid, active[i])
        joining = [states[i] for i in queue.take(len(active) - len(done), self._now(stats), self.steps)]
        for s in joining:
            self.timings[s.rid].admitted, self.timings[s.rid].admitted_step = self._now(stats), self.steps
        groups = prefill_groups(joining, self.prefill_tokens)
        if groups and len(done) == len(active):   # nothing runs on: the (first) joiners are the batch
            cache, active, done = SlotCache(), list(groups[0]), []
            self._prefill(groups.pop(0), cache, stats)
        for group in groups:
            fresh = SlotCache()
            self._prefill(group, fresh, stats)
            t = time.perf_counter()
            dst = done[:len(group)] + list(range(len(active), len(active) + len(group) - len(done[:len(group)])))
            cache.place(fresh, dst)
            active = list(active)
            for i, s in zip(dst, group):
                if i < len(active):
                    active[i] = s
                else:
                    active.append(s)
            done = done[len(group):]
            stats.t_prefill += time.perf_counter() - t
        if done:
            gone = set(done)
            keep = [i for i in range(len(active)) if i not in gone]
            if keep:
                cache.select_rows(torch.tensor(keep, device=self.device))
            active = [active[i] for i in keep]
        if active and cache.removable > max(16, self.compact_fraction * cache.num_slots):
            cache.compact()
        return cache, active
