"""Packed vs padded verification step, side by side: `python -m dspark.eval.packed_cost`.

For R rows over a `--context`-token cache, one row verifies a full block (γ+1 tokens) and the others
either nothing but their anchor ("one long") or a random share of the block ("mixed"). Both forwards
run interleaved on the same cache (median of `--repeats`), so the ratio is fair on a busy machine.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from dspark.inference.cache import SlotCache
from dspark.inference.packed import Packing, additive_mask


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
                p = Packing.of(sizes, width, dev)
                out = target.cached_forward(p.pack(new), additive_mask(cache.valid, new_valid, target.dtype),
                                            p.pack(pos), cache, True, packing=p)
                p.unpack(out.logits)
            else:
                target.cached_forward(new, cache.attention_mask(new_valid), pos, cache, True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k:   # the first round is a warm-up
                times[mode].append(time.perf_counter() - t0)
            cache.append_valid(new_valid)
            cache.truncate(width)
    return statistics.median(times["padded"]), statistics.median(times["packed"])


@torch.no_grad()
def main(argv=None) -> None:
    from importlib.resources import files

    from omegaconf import OmegaConf

    from dspark.models.target import load_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m", help="a conf/target name")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--width", type=int, default=8, help="γ + 1")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    target = load_target(OmegaConf.create(files("dspark.conf").joinpath("target", f"{a.target}.yaml").read_text()))
    rng = random.Random(0)
    print(f"{target.name} ({str(target.dtype).replace('torch.', '')}), context {a.context}, width {a.width}, "
          f"{torch.get_num_threads()} threads")
    print("| R | rows | verified B / padded R·W | padded ms | packed ms | packed / padded |\n|---|---|---|---|---|---|")
    for r in a.rows:
        for kind in ("one long", "mixed"):
            sizes = [a.width] + ([1] * (r - 1) if kind == "one long" else
                                 [rng.randint(1, a.width) for _ in range(r - 1)])
            padded, packed = step_times(target, sizes, a.width, a.context, a.repeats)
            print(f"| {r} | {kind} | {sum(sizes)} / {r * a.width} | {1e3 * padded:.1f} | {1e3 * packed:.1f} | "
                  f"{packed / padded:.2f} |", flush=True)


if __name__ == "__main__":
    main()
