"""Step-cost profile for the confidence scheduler: seconds of one verification step of the
runtime's real shape — R rows of width T (anchor + T−1 drafts) over the shared slot cache — on
this machine, target and dtype. SPS(R, T) = 1 / cost(R, T).

Measured once (median of `repeats` runs after a warm-up, at a fixed context length) and cached in a
JSON file keyed by machine + target + dtype + runtime version; `reprofile=True` measures again.
Between profiled R the cost is interpolated linearly (and extrapolated from the last two levels).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.core.files import write_json_atomic

from .cache import SlotCache

PROFILE_FORMAT = 2     # bump when the runtime's verification step changes shape or cost (2: grouped attention)


def runtime_version() -> str:
    try:
        v = version("dspark")
    except PackageNotFoundError:
        v = "dev"
    return f"{v}/profile{PROFILE_FORMAT}"


def machine_id() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"{platform.node()}|{platform.machine()}|{os.cpu_count()} cpus|"
            f"{torch.get_num_threads()} threads|{gpu}|torch {torch.__version__}")


class StepCost:
    """cost(R, T) in seconds from a table {R: [cost at T = 1, 2, …]}."""

    def __init__(self, table: dict[int, list[float]], meta: dict | None = None):
        if not table or any(not row for row in table.values()):
            raise ValueError("empty step-cost table")
        self.table = {int(r): [float(c) for c in row] for r, row in sorted(table.items(), key=lambda kv: int(kv[0]))}
        self.rows = sorted(self.table)
        self.meta = meta or {}

    def _at(self, r: int, t: int) -> float:
        row = self.table[r]
        if t <= len(row):
            return row[max(t, 1) - 1]
        slope = row[-1] - row[-2] if len(row) > 1 else 0.0
        return row[-1] + slope * (t - len(row))

    def __call__(self, r: int, t: int) -> float:
        rows = self.rows
        if r in self.table:
            return self._at(r, t)
        lo = max([x for x in rows if x < r], default=None)
        hi = min([x for x in rows if x > r], default=None)
        if lo is None or hi is None:            # extrapolate from the nearest two levels
            pair = rows[:2] if lo is None else rows[-2:]
            if len(pair) == 1:
                return self._at(pair[0], t)
            lo, hi = pair
        c_lo, c_hi = self._at(lo, t), self._at(hi, t)
        return max(c_lo + (c_hi - c_lo) * (r - lo) / (hi - lo), 1e-6)

    def to_json(self) -> dict:
        return {"meta": self.meta, "table": {str(r): row for r, row in self.table.items()}}


def packed_cost(cost, r: int, b: int) -> float:
    """Seconds of a packed step (inference/packed.py) of b tokens in r rows from a padded cost(R, T):
    the padded step with the same tokens, width b / r, interpolated between whole widths. Its linear
    layers cost the same; attention is a small share at these sizes."""
    t = b / r
    lo = max(int(t), 1)
    c_lo = cost(r, lo)
    return c_lo + (cost(r, lo + 1) - c_lo) * (t - lo) if t > lo else c_lo


@torch.no_grad()
def measure(target, rows: list[int], max_width: int, context: int = 256, repeats: int = 5,
            want_hidden: bool = True, progress: bool = True) -> dict[int, list[float]]:
    """Median seconds of one verification forward (`Target.cached_forward`, as the runtime runs it) for
    each R in `rows` and T = 1..max_width."""
    dev = target.device
    vocab = target.vocab_size
    gen = torch.Generator().manual_seed(0)
    table = {}
    bar = tqdm(total=len(rows) * max_width, desc="profiling verification cost", unit="shape", disable=not progress)
    for r in rows:
        cache = SlotCache()
        ids = torch.randint(0, vocab, (r, context), generator=gen).to(dev)
        valid = torch.ones(r, context, dtype=torch.bool, device=dev)
        pos = torch.arange(context, device=dev).expand(r, -1)
        target.cached_forward(ids, valid.long(), pos, cache, logits_to_keep=1)
        cache.append_valid(valid)
        costs = []
        for t in range(1, max_width + 1):
            new_ids = torch.randint(0, vocab, (r, t), generator=gen).to(dev)
            new_valid = torch.ones(r, t, dtype=torch.bool, device=dev)
            new_pos = context + torch.arange(t, device=dev).expand(r, -1)
            times = []
            for k in range(repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                target.cached_forward(new_ids, cache.attention_mask(new_valid), new_pos, cache, want_hidden)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if k:                    # the first run is a warm-up
                    times.append(time.perf_counter() - t0)
                cache.append_valid(new_valid)
                cache.truncate(t)
            costs.append(statistics.median(times))
            bar.update(1)
        table[r] = costs
    bar.close()
    return table


def profile_levels(max_rows: int) -> list[int]:
    """Powers of two up to max_rows, plus max_rows itself."""
    levels, r = [], 1
    while r < max_rows:
        levels.append(r)
        r *= 2
    return sorted(set(levels + [max_rows]))


def step_cost_profile(target, max_rows: int, max_width: int, cache_dir: str | Path, context: int = 256,
                      repeats: int = 5, reprofile: bool = False) -> StepCost:
    """The cached profile for this machine/target/dtype/runtime, measuring (and caching) it when missing,
    when it does not cover the requested shapes, or when `reprofile` is set."""
    key = {"machine": machine_id(), "target": f"{target.name} ({getattr(target, 'source', '')})",
           "dtype": str(target.dtype).replace("torch.", ""), "runtime": runtime_version(), "context": context,
           "cpu_gemm": bool(getattr(target, "cpu_gemm", False))}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(os.path.expanduser(str(cache_dir))) / f"step-cost-{digest}.json"
    levels = profile_levels(max_rows)
    if path.is_file() and not reprofile:
        try:
            saved = json.loads(path.read_text())
            cost = StepCost(saved["table"], saved["meta"])
            if set(levels) <= set(cost.rows) and all(len(r) >= max_width for r in cost.table.values()):
                cost.meta["cached"] = str(path)
                return cost
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            pass                          # a damaged or stale cache is measured again
    table = measure(target, levels, max_width, context=context, repeats=repeats)
    cost = StepCost(table, {**key, "repeats": repeats, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_json_atomic(path, cost.to_json())
    cost.meta["cached"] = str(path)
    return cost
