"""`python -m dspark.train_cost [train overrides …]`: a training step side by side, scoring the target over its
whole vocabulary at every drafted position (`keep_target_stats=false`) vs over the draft vocabulary with
each row's whole-vocabulary statistics kept (the default; warm, as after the first epoch).

The same batches of the training split, interleaved, forward + backward of the objective; prints the median
step of each and their ratio, and what computing the kept statistics costs the first time a row is seen.
Overrides are those of `dspark train` (data_dir, features, draft, …); nothing is written.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch


def main(argv=None) -> None:
    from hydra import compose, initialize_config_module

    from .guard import guarded

    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp, initialize_config_module("dspark.conf", version_base="1.3"):
        guarded("train", measure, compose("train", overrides=[f"output_dir={tmp}", "logger=none", *argv]))


def measure(cfg, batches_n: int = 12) -> None:
    """`batches_n` batches of the training split, each timed twice per side."""
    from dspark.train.data import collate
    from dspark.train.trainer import Trainer

    t = Trainer(cfg)
    o = t.objective
    kept, whole = (type(o)(o.model, o.target, o.features, o.anchors_per_seq, o.alpha, keep_stats=k) for k in (True, False))
    b = cfg.batch_size
    batches = [collate(t.train_rows[i:i + b]) for i in range(0, min(len(t.train_rows), batches_n * b), b)]
    t0 = time.perf_counter()
    for x in batches:   # first sight of each row: its statistics
        kept.stats(x, kept.features(x)[1], torch.zeros(len(x["prompt_id"]), 1, dtype=torch.long))
    first = (time.perf_counter() - t0) / len(batches)
    times = {"whole": [], "kept": []}
    for rep in range(2):
        for i, x in enumerate(batches):
            order = (("whole", whole), ("kept", kept)) if (i + rep) % 2 else (("kept", kept), ("whole", whole))
            for name, obj in order:
                t0 = time.perf_counter()
                loss, count, _ = obj.forward_loss(x, torch.Generator().manual_seed(i), t.head)
                (loss / count).backward()
                t.head.zero_grad()
                times[name].append(time.perf_counter() - t0)
    w, k = statistics.median(times["whole"]), statistics.median(times["kept"])
    print(f"{t.target.name}, {t.head.config.kind} head, draft vocabulary {t.head.config.draft_vocab_size} of "
          f"{t.target.vocab_size}, {b} rows × {kept.anchors_per_seq} anchors per step, {torch.get_num_threads()} threads")
    print("| step (forward + backward) | whole vocabulary each step | kept statistics | kept / whole |")
    print("|---|---|---|---|")
    print(f"| median of {len(times['kept'])} | {1e3 * w:.1f} ms | {1e3 * k:.1f} ms | {k / w:.2f} |")
    print(f"first sight of a row (its statistics, once per run): {1e3 * first:.1f} ms per {b} rows")


if __name__ == "__main__":
    main()
