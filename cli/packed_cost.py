"""`python -m dspark.packed_cost`: packed vs padded verification step, side by side (eval/packed_cost.py).

For R rows over a `--context`-token cache, one row verifies a full block (γ+1 tokens) and the others
either only their anchor ("one long") or a random share of the block ("mixed").
"""
from __future__ import annotations

import argparse
import random

import torch


@torch.no_grad()
def main(argv=None) -> None:
    from importlib.resources import files

    from omegaconf import OmegaConf

    from dspark.eval.packed_cost import step_times
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
    print("| R | rows | verified B / padded R·W | padded ms | packed ms | packed / padded |")
    print("|---|---|---|---|---|---|")
    for r in a.rows:
        for kind in ("one long", "mixed"):
            sizes = [a.width] + ([1] * (r - 1) if kind == "one long" else
                                 [rng.randint(1, a.width) for _ in range(r - 1)])
            padded, packed = step_times(target, sizes, a.width, a.context, a.repeats)
            print(f"| {r} | {kind} | {sum(sizes)} / {r * a.width} | {1e3 * padded:.1f} | {1e3 * packed:.1f} | "
                  f"{packed / padded:.2f} |", flush=True)


if __name__ == "__main__":
    main()
