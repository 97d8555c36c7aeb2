"""Packed vs padded verification step, side by side (`python -m dspark.packed_cost`, cli/packed_cost.py).

Both forwards run interleaved on the same cache (median of `repeats`), so the ratio is fair on a busy
machine.
"""
from __future__ import annotations

import statistics
import time

import torch

from dspark.inference.cache import SlotCache
from dspark.inference.packed import Packing, packed_forward


def step_times(target, sizes: list[int], width: int, context: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the padded and the packed step for rows of `sizes` tokens each."""
    r, dev = len(sizes), target.device
    cache = SlotCache()
    ids = torch.randint(0, target.vocab_size, (r, context), device=dev)
    valid = torch.ones(r, context, dtype=torch.bool, device=dev)
    target.cached_forward(ids, valid.long(), torch.arange(context, device=dev).expand(r, -1), cache, logits_to_keep=1)
    cache.append_valid(valid)
    new = torch.randint(0, target.vocab_size, (r, width), device=dev)
    new_valid = torch.arange(width, device=dev)[None] < torch.tensor(sizes, device=dev)[:, None]
    pos = context + torch.arange(width, device=dev).expand(r, -1)
    times = {"padded": [], "packed": []}
    for k in range(repeats + 1):
        for mode in times:
            t0 = time.perf_counter()
            if mode == "packed":
                packed_forward(target, new, cache.valid, new_valid, pos, cache, (target.num_layers,),
                               Packing.of(sizes, width, dev))
            else:
                target.cached_forward(new, cache.attention_mask(new_valid), pos, cache, True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k:   # the first round is a warm-up
                times[mode].append(time.perf_counter() - t0)
            cache.append_valid(new_valid)
            cache.truncate(width)
    return statistics.median(times["padded"]), statistics.median(times["packed"])
