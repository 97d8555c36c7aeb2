"""The drafter interface, the base of the trained-head drafters (`HeadDrafter`; the heads' own drafters
are in dspark_drafter.py and eagle3_drafter.py) and the drafters that need no training: prompt
lookup, the oracle and a random drafter for tests.

A drafter sees each active request's `RequestState` and proposes up to `limit` tokens with, per
position, the full draft distribution (needed for lossless rejection sampling; `None` means a
deterministic drafter, i.e. a point mass on the proposed token) and optional confidences. After
verification it gets back how many tokens survived and, when it asked for them through
`feature_layers`, the target's hidden states at the verified positions.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from dspark.models import cpu_gemm

from .compiled_head import compile_head_
from .int8_weights import quantize_head_

DRAFT_WEIGHTS = ("native", "int8")   # a head drafter's matrices: in the target's dtype, or int8 rows


@dataclass
class RequestState:
    """What the runtime knows about one request. `tokens[-1]` is the anchor: the last token the
    target produced, not yet in its KV cache (its position is `len(tokens) - 1`)."""

    rid: int
    tokens: list[int]
    n_prompt: int
    max_new_tokens: int
    done: bool = False
    finish_reason: str = ""
    logits: list = field(default_factory=list)     # per emitted token, when recorded
    margins: list = field(default_factory=list)    # top-1 − top-2 logit gap per emitted token

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - (len(self.tokens) - self.n_prompt)


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None          # (ℓ, V) draft distribution over the target vocab
    confidences: list[float] | None = None     # per-position survival estimates, if any


class Drafter:
    """Base class: override `propose`; the hooks are optional."""

    name = "drafter"
    feature_layers: tuple[int, ...] = ()   # indices into the target's hidden_states to receive
    charged = True                          # False: proposal time is not counted (oracle ceiling)

    def start(self, states: list[RequestState], features: list[torch.Tensor] | None) -> None:
        """After prefill. features[i]: (n_prompt − 1, k·H) for states[i] when feature_layers set."""

    def propose(self, states: list[RequestState], limits: list[int]) -> list[Proposal]:
        raise NotImplementedError

    def update(self, states: list[RequestState], accepted: list[int],
               features: list[torch.Tensor] | None) -> None:
        """After a step: accepted[i] drafts of states[i] survived; features[i] is (1 + accepted, k·H)
        for the anchor and the accepted drafts (now in the target's cache)."""

    def finish(self, state: RequestState) -> None:
        """The request left the batch."""


class HeadDrafter(Drafter):
    """Base for drafters driven by a trained head: shares the target's embedding and LM head with
    it and receives the hidden-state layers it was trained on. The head runs in the target's dtype
    (moved in place): in bf16 its small matmuls cost a fraction of fp32's on CPU, and a draft only
    needs to be likely, since verification keeps the output exact. `draft_weights="int8"` keeps
    its matrices as int8 rows (inference/int8_weights.py: half the bytes a proposal reads);
    `draft_compile=True` runs its hot methods through torch.compile (inference/compiled_head.py)."""

    def __init__(self, head, target, temperature: float = 0.0, seed: int = 0, draft_weights: str = "native",
                 draft_compile: bool = False):
        if draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(f"draft_weights '{draft_weights}' is unknown: choose from {DRAFT_WEIGHTS}")
        if draft_weights == "int8" or draft_compile:   # a copy of its own: the caller's head stays as it is
            head = copy.deepcopy(head).to(target.device, target.dtype)
        if draft_weights == "int8":
            quantize_head_(head)
        if draft_compile:
            compile_head_(head)
        self.head = head.to(target.device, target.dtype).attach(target).eval()
        if getattr(target, "cpu_gemm", False):   # the target's bf16 kernel serves its head too (models/cpu_gemm.py)
            cpu_gemm.install_(self.head)
            self.head.logits_linear = cpu_gemm.linear
            if hasattr(self.head, "markov_greedy"):
                self.head.markov_greedy = cpu_gemm.markov_greedy
        self.name = head.config.kind
        self.feature_layers = tuple(head.config.target_layer_ids)
        self.temperature = float(temperature)
        self.vocab_size = target.vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def propose(self, states, limits):
        rows = [i for i, n in enumerate(limits) if n > 0]
        out = [Proposal(tokens=[]) for _ in states]
        if rows:
            self.propose_rows(states, limits, rows, out)
        return out

    def propose_rows(self, states, limits, rows: list[int], out: list) -> None:
        """Fill `out[i]` for every request i in `rows` (those with a drafting limit > 0)."""
        raise NotImplementedError


class PromptLookupDrafter(Drafter):
    """n-gram prompt lookup: find the most recent earlier occurrence of the longest suffix n-gram
    (max_ngram down to min_ngram) in prompt + output and propose the tokens that followed it.
    Occurrences live in a per-request hash index updated incrementally (O(1) per step)."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("prompt lookup needs 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._index: dict[int, list[dict]] = {}
        self._upto: dict[int, int] = {}

    def _refresh(self, s: RequestState) -> list[dict]:
        idx = self._index.setdefault(s.rid, [dict() for _ in range(self.max_ngram + 1)])
        toks, end = s.tokens, len(s.tokens) - 1
        for e in range(self._upto.get(s.rid, 0) + 1, end + 1):   # ends strictly before the suffix
            for n in range(self.min_ngram, self.max_ngram + 1):
                if e - n >= 0:
                    idx[n][tuple(toks[e - n:e])] = e
        self._upto[s.rid] = max(end, self._upto.get(s.rid, 0))
        return idx

    def propose(self, states, limits):
        out = []
        for s, limit in zip(states, limits):
            idx, toks, found = self._refresh(s), s.tokens, []
            if limit > 0:
                for n in range(self.max_ngram, self.min_ngram - 1, -1):
                    start = idx[n].get(tuple(toks[-n:])) if len(toks) > n else None
                    if start is not None:
                        found = toks[start:start + limit]
                        break
            out.append(Proposal(tokens=found))
        return out

    def finish(self, state):
        self._index.pop(state.rid, None)
        self._upto.pop(state.rid, None)


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation: the physical ceiling of any drafter.

    `streams` (rid → greedy output of a plain run) seeds it; whenever the speculative output leaves
    the stream (a bf16 near-tie resolved differently at a T ≥ 2 forward, docs/design.md §5) the
    continuation is re-derived from the current sequence by greedy decoding. Its time is not
    charged: the oracle models a free drafter, so its rows measure the runtime's ceiling."""

    name = "oracle"
    charged = False

    def __init__(self, target, streams: dict[int, list[int]] | None = None):
        self.target = target
        self.streams = dict(streams or {})

    def _continuation(self, s: RequestState) -> list[int]:
        gen = s.generated
        stream = self.streams.get(s.rid)
        if stream is None or stream[:len(gen)] != gen:
            stream = gen + self._greedy(s.tokens, s.remaining)
            self.streams[s.rid] = stream
        return stream[len(gen):]

    @torch.no_grad()
    def _greedy(self, tokens: list[int], n: int) -> list[int]:
        if n <= 0:
            return []
        ids = torch.tensor([tokens], device=self.target.device)
        out = self.target.hf_generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      do_sample=False, eos_token_id=self.target.eos_token_ids,
                                      pad_token_id=self.target.eos_token_ids[0])
        return out[0, len(tokens):].tolist()

    def propose(self, states, limits):
        out = []
        for s, limit in zip(states, limits):
            out.append(Proposal(tokens=self._continuation(s)[:limit] if limit > 0 else []))
        return out


class RandomDrafter(Drafter):
    """A deliberately bad drafter for tests: samples each token from a random distribution and
    reports it honestly (exercises rejection, residual resampling and rollback)."""

    name = "random"

    def __init__(self, vocab_size: int, gamma: int, seed: int = 0, sharpness: float = 3.0):
        self.vocab_size, self.gamma = vocab_size, gamma
        self.gen = torch.Generator().manual_seed(seed)
        self.sharpness = sharpness

    def propose(self, states, limits):
        out = []
        for limit in limits:
            if limit <= 0:
                out.append(Proposal(tokens=[]))
                continue
            logits = torch.randn(limit, self.vocab_size, generator=self.gen) * self.sharpness
            probs = torch.softmax(logits, dim=-1)
            toks = torch.multinomial(probs, 1, generator=self.gen)[:, 0].tolist()
            out.append(Proposal(tokens=toks, probs=probs))
        return out
