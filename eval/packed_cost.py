"""Step costs side by side (`python -m dspark.packed_cost`, cli/packed_cost.py): packed vs padded
verification, grouped vs Hugging Face eager attention in a decode step, and a head's proposal with
its native vs int8 weights.

Both forwards of a pair run interleaved on the same cache (median of `repeats`), so the ratio is fair on
a busy machine.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from dspark.inference.cache import SlotCache
from dspark.inference.drafters import DRAFT_WEIGHTS, RequestState
from dspark.inference.head_drafters import drafter_for
from dspark.inference.packed import Packing, packed_forward
from dspark.models.attention import GROUPED


def _filled_cache(target, rows: int, context: int) -> SlotCache:
    dev = target.device
    cache = SlotCache()
    ids = torch.randint(0, target.vocab_size, (rows, context), device=dev)
    valid = torch.ones(rows, context, dtype=torch.bool, device=dev)
    target.cached_forward(ids, valid.long(), torch.arange(context, device=dev).expand(rows, -1), cache,
                          logits_to_keep=1)
    cache.append_valid(valid)
    return cache


def _timed(run, after, modes: list[str], repeats: int, dev) -> dict[str, float]:
    """Median seconds of run(mode) per mode, the modes interleaved, after one warm-up round; after(mode)
    (the cache's bookkeeping) runs untimed."""
    times = {m: [] for m in modes}
    for k in range(repeats + 1):
        for mode in modes:
            t0 = time.perf_counter()
            run(mode)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k:
                times[mode].append(time.perf_counter() - t0)
            after(mode)
    return {m: statistics.median(v) for m, v in times.items()}


def attention_times(target, rows: int, context: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a decode step (one token per row over `context` cached tokens) with Hugging
    Face's eager attention and with the grouped attention the runtime uses."""
    dev = target.device
    cache = _filled_cache(target, rows, context)
    new, one = torch.randint(0, target.vocab_size, (rows, 1), device=dev), torch.ones(rows, 1, dtype=torch.bool,
                                                                                        device=dev)
    pos = torch.full((rows, 1), context, device=dev)

    def run(mode):
        target.cached_forward(new, cache.attention_mask(one), pos, cache, attention=mode)

    def after(mode):
        cache.append_valid(one)
        cache.truncate(1)

    t = _timed(run, after, ["eager", GROUPED], repeats, dev)
    return t["eager"], t[GROUPED]


def step_times(target, sizes: list[int], width: int, context: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the padded and the packed step for rows of `sizes` tokens each."""
    r, dev = len(sizes), target.device
    cache = _filled_cache(target, r, context)
    new = torch.randint(0, target.vocab_size, (r, width), device=dev)
    new_valid = torch.arange(width, device=dev)[None] < torch.tensor(sizes, device=dev)[:, None]
    pos = context + torch.arange(width, device=dev).expand(r, -1)

    def run(mode):
        if mode == "packed":
            packed_forward(target, new, cache.valid, new_valid, pos, cache, (target.num_layers,),
                           Packing.of(sizes, width, dev))
        else:
            target.cached_forward(new, cache.attention_mask(new_valid), pos, cache, True)

    def after(mode):
        cache.append_valid(new_valid)
        cache.truncate(width)

    t = _timed(run, after, ["padded", "packed"], repeats, dev)
    return t["padded"], t["packed"]


def proposal_times(target, head, context: int, repeats: int, new_tokens: int = 3,
                   compiled: bool = False, warm: bool = False) -> dict[str, float]:
    """Median seconds of one R = 1 proposal of `head` (a full block) per `DRAFT_WEIGHTS` entry (and,
    with `compiled`, each again through torch.compile: "int8+compile"; on a target that runs the bf16
    kernel, also native weights drafting greedy Markov blocks through the head's own loop), each right
    after a target decode step over a `context`-token cache (as in the runtime: the step leaves the head's
    weights out of cache; `warm`: no target step between proposals), with `new_tokens` new context
    positions to project per proposal."""
    dev = target.device
    cache = _filled_cache(target, 1, context)
    one, tok = torch.ones(1, 1, dtype=torch.bool, device=dev), torch.zeros(1, 1, dtype=torch.long, device=dev)
    width = len(head.config.target_layer_ids) * target.hidden_size
    gen = torch.Generator().manual_seed(0)

    def feats(n):
        return torch.randn(n, width, generator=gen).to(dev, target.dtype)

    variants = [(w, c) for c in ((False, True) if compiled else (False,)) for w in DRAFT_WEIGHTS]
    drafters, states = {}, {}
    for w, c in variants:
        name = w + "+compile" * c
        drafters[name] = drafter_for(head, target, draft_weights=w, draft_compile=c)
    if getattr(drafters["native"].head, "markov_greedy", None) is not None:   # the kernel's block vs the loop
        drafters["native, head's loop"] = d = drafter_for(copy.deepcopy(head), target)
        d.head.markov_greedy = None
    for name in drafters:
        states[name] = RequestState(rid=0, tokens=list(range(100, 100 + context)), n_prompt=context, max_new_tokens=1)
        drafters[name].start([states[name]], [feats(context)])

    def run(name):
        drafters[name].propose([states[name]], [head.config.gamma])

    def after(name):
        drafters[name].update([states[name]], [new_tokens - 1], [feats(new_tokens)])
        states[name].tokens += [5] * new_tokens
        if warm:
            return
        target.cached_forward(tok, cache.attention_mask(one), torch.full((1, 1), context, device=dev), cache)
        cache.truncate(1)

    for name in drafters:   # the first proposals project the whole context (and compile): not a step's cost
        for _ in range(3 if compiled else 1):
            run(name)
            after(name)
    return _timed(run, after, list(drafters), repeats, dev)


def gemm_times(cfg, widths: list[int], context: int, repeats: int) -> dict[str, list[float]]:
    """Median seconds of an R = 1 verification forward over each of `widths` new tokens, for the target of
    `cfg` with torch's bf16 linear layers ("torch"), with models/cpu_gemm's linear layers only ("linears")
    and with its linear layers and RMSNorms ("avx2", what `target.cpu_gemm` installs): three copies,
    forwards interleaved."""
    from omegaconf import OmegaConf

    from dspark.models import cpu_gemm
    from dspark.models.target import load_target

    targets = {mode: load_target(OmegaConf.merge(cfg, {"cpu_gemm": mode})) for mode in ("torch", "avx2")}
    linears = targets["linears"] = load_target(OmegaConf.merge(cfg, {"cpu_gemm": "torch"}))
    cpu_gemm.install_(linears.model, norms=False)
    linears.cpu_gemm = True
    targets = {m: targets[m] for m in ("torch", "linears", "avx2")}
    caches = {mode: _filled_cache(t, 1, context) for mode, t in targets.items()}
    out = {mode: [] for mode in targets}
    for w in widths:
        one = torch.ones(1, w, dtype=torch.bool)
        ids, pos = torch.zeros(1, w, dtype=torch.long), torch.arange(context, context + w)[None]

        def run(mode):
            targets[mode].cached_forward(ids, caches[mode].attention_mask(one), pos, caches[mode])

        def after(mode):
            caches[mode].truncate(w)

        t = _timed(run, after, list(targets), repeats, torch.device("cpu"))
        for mode in targets:
            out[mode].append(t[mode])
    return out
