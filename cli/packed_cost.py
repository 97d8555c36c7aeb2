"""`python -m dspark.packed_cost`: step costs side by side (eval/packed_cost.py).

Packed vs padded verification: for R rows over a `--context`-token cache, one row verifies a full block
(γ+1 tokens) and the others either only their anchor ("one long") or a random share of the block
("mixed"). Then grouped vs Hugging Face eager attention in a decode step (one token per row), at
`--decode-rows` rows over `--decode-contexts` cached tokens. With `--head`, a trained head's proposal at
R = 1 with its native and its int8 weights (`draft_weights`; `--compile`: each also through torch.compile,
`draft_compile`), each right after a target decode step. With `--cpu-gemm`, the target's forward over
1 … `--width` new tokens with torch's bf16 linear layers vs `models/cpu_gemm.c` (`target.cpu_gemm`).
"""
from __future__ import annotations

import argparse
import random
import sys

import torch


@torch.no_grad()
def main(argv=None) -> None:
    from importlib.resources import files

    from omegaconf import OmegaConf

    from dspark.eval.packed_cost import attention_times, gemm_times, proposal_times, step_times
    from dspark.hub.io import load_head
    from dspark.models.target import load_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m", help="a conf/target name")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--width", type=int, default=8, help="γ + 1")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode-rows", type=int, nargs="+", default=[1, 8, 16, 48])
    ap.add_argument("--decode-contexts", type=int, nargs="+", default=[256, 600])
    ap.add_argument("--head", help="a trained head folder: time its proposals (native vs int8 weights) only")
    ap.add_argument("--compile", action="store_true", help="with --head: also time each through torch.compile")
    ap.add_argument("--warm", action="store_true", help="with --head: no target step between proposals (warm caches)")
    ap.add_argument("--cpu-gemm", action="store_true",
                    help="only: the target's forward with torch's bf16 linear layers vs models/cpu_gemm.c's "
                         "(linear layers only, then with its RMSNorm too)")
    a = ap.parse_args(argv)
    cfg = OmegaConf.create(files("dspark.conf").joinpath("target", f"{a.target}.yaml").read_text())
    if a.cpu_gemm:
        widths = sorted({1, 2, 4, a.width})
        t = gemm_times(cfg, widths, a.context, a.repeats)
        print(f"{cfg.name} ({cfg.dtype}), R = 1, context {a.context}, {torch.get_num_threads()} threads, "
              f"median of {a.repeats}, interleaved")
        print("| new tokens | torch ms | kernel linears ms | kernel linears + RMSNorm ms | kernel / torch | "
              "+ RMSNorm / linears | torch / its 1 token | kernel / its 1 token |")
        print("|---|---|---|---|---|---|---|---|")
        for i, w in enumerate(widths):
            tt, tl, tk = t["torch"][i], t["linears"][i], t["avx2"][i]
            print(f"| {w} | {1e3 * tt:.1f} | {1e3 * tl:.1f} | {1e3 * tk:.1f} | {tk / tt:.2f} | {tk / tl:.2f} | "
                  f"{tt / t['torch'][0]:.2f} | {tk / t['avx2'][0]:.2f} |")
        return
    target = load_target(cfg)
    if a.head:
        head = load_head(a.head)
        print(f"{target.name} ({str(target.dtype).replace('torch.', '')}), {a.head} ({head.config.kind}), context "
              f"{a.context}, R = 1, {torch.get_num_threads()} threads, median of {a.repeats}")
        t = proposal_times(target, head, a.context, a.repeats, compiled=a.compile, warm=a.warm)
        when = "with warm caches" if a.warm else "after a target step"
        print(f"| proposal {when} (γ = {head.config.gamma}) | ms | / native |\n|---|---|---|")
        for name, s in t.items():
            print(f"| {name} | {1e3 * s:.2f} | {s / t['native']:.2f} |")
        return
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
    if not target.use_grouped_attention:
        print("\nthis target's runtime does not use grouped attention (not eager, or not Llama-like causal "
              "attention): no attention table")
        return
    print("\n| decode rows | context | eager attention ms | grouped ms | grouped / eager |")
    print("|---|---|---|---|---|")
    for c in a.decode_contexts:
        for r in a.decode_rows:
            eager, grouped = attention_times(target, r, c, a.repeats)
            print(f"| {r} | {c} | {1e3 * eager:.1f} | {1e3 * grouped:.1f} | {grouped / eager:.2f} |", flush=True)


if __name__ == "__main__":
    from dspark.core.errors import DSparkError

    try:
        main()
    except DSparkError as e:   # bad input: one line, exit 2 (a head folder that is not one, no kernel here)
        print(f"dspark packed_cost: error: {e}", file=sys.stderr)
        sys.exit(2)
