"""`dspark bench` under arrivals (`load.rates`): requests arrive as a Poisson process and join the
running batch (continuous batching, inference/batching.py), at most `load.max_batch` rows at once.

At each rate every runtime method of the bench (plain, the drafter-free methods, every trained head
under every policy; not the Hugging Face rows, which serve one request at a time) serves the same
`load.requests` requests (the prompt set, cyclically) arriving at the same times. The gaps between
arrivals are one seeded sequence of unit exponentials scaled by 1/rate (mean gap 1/rate s, the first
request at 0): every method at a rate sees identical times, and the rates differ only in scale. The
methods run rate by rate (all methods at one rate before the next rate, the order rotated per rate),
so load that drifts during the run hits all of them alike. Per method and rate: aggregate tokens/s
(tokens / wall), mean per-user tokens/s (tokens / (finished − admitted)), latency (finished −
arrival: mean and p90), queueing delay (admitted − arrival) and time to first token (first token −
arrival), all in the engine's charged seconds (`Result.timings`), and whether the outputs equal the
plain reference (greedy). `sched_vs_gamma1` compares a head's per-user speed under `sched` with
`gamma1` (the paper's MTP-1-like production baseline), both at each rate (the same offered load) and
at gamma1's aggregate throughput (sched's per-user speed interpolated along its own curve).
"""
from __future__ import annotations

import random

from tqdm import tqdm

from dspark.core.methods import Method

from .report import per_user_at


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """`n` arrival times in seconds: 0, then exponential gaps of mean 1/rate drawn from `seed` (the
    same unit gaps at every rate, scaled)."""
    rng = random.Random(int(seed))
    out, t = [0.0], 0.0
    for _ in range(n - 1):
        t += rng.expovariate(1.0) / float(rate)
        out.append(t)
    return out[:n]


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the order statistics (numpy's default)."""
    v = sorted(values)
    x = q * (len(v) - 1)
    lo = int(x)
    return v[lo] if lo + 1 >= len(v) else v[lo] + (x - lo) * (v[lo + 1] - v[lo])


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def run_arrivals(bench, reference: list[list[int]]) -> dict:
    """Every runtime method at every rate of `bench.cfg.load`; `reference`: plain greedy output per prompt."""
    c, load = bench.cfg, bench.cfg.load
    n, count = len(bench.prompts), int(load.requests)
    prompts = [bench.prompts[i % n] for i in range(count)]
    methods = [m for m in bench.methods() if not m.hugging_face]
    engines = {m: bench.engine(m) for m in methods}
    rates = [float(r) for r in load.rates]
    times = [arrival_times(count, rate, load.seed) for rate in rates]
    rows: dict[str, list[dict]] = {m.name: [] for m in methods}
    for k, (rate, arrivals) in enumerate(zip(rates, times)):
        order = methods[k % len(methods):] + methods[:k % len(methods)]
        for m in tqdm(order, desc=f"arrivals {rate:g}/s × {count}", unit="method"):
            engine = engines[m]
            if m.head == "oracle":   # the oracle's streams are keyed by request index
                engine.drafter.streams = {i: list(bench.streams[i % n]) for i in range(count) if i % n in bench.streams}
            res = engine.generate(prompts, c.max_new_tokens, seed=[c.seed + i for i in range(count)],
                                  eos_token_ids=[] if c.ignore_eos else None, max_batch=int(load.max_batch),
                                  arrivals=arrivals, arrival_unit="s")
            rows[m.name].append(_point(bench, res, rate, reference))
    for m in methods:
        rows[m.name] = {"method": m.to_json(), "points": rows[m.name]}
    return {"rates": rates, "requests": count, "max_batch": int(load.max_batch), "seed": int(load.seed),
            "arrival_times": times, "methods": rows, "sched_vs_gamma1": sched_vs_gamma1(rows)}


def _point(bench, res, rate: float, reference: list[list[int]]) -> dict:
    s, t = res.stats.summary(), res.timings
    latency = [x.finished - x.arrival for x in t]
    point = {"rate": rate, "tokens": s["tokens"], "wall_s": s["time_s"]["wall"], "tokens_per_s": s["tokens_per_s"],
             "per_user_tokens_per_s": s["per_user_tokens_per_s"], "mean_latency_s": _mean(latency),
             "p90_latency_s": quantile(latency, 0.9), "mean_queue_s": _mean([x.admitted - x.arrival for x in t]),
             "mean_ttft_s": _mean([x.first_token - x.arrival for x in t]), "tau": s["tau"],
             "last_arrival_s": max(x.arrival for x in t)}
    return {**point, **bench.exactness(res.outputs, reference)}


def sched_vs_gamma1(rows: dict[str, dict]) -> list[dict]:
    """For every head run under both `sched` and `gamma1` (alone, not combined): per rate, gamma1's
    aggregate and per-user tokens/s, sched's, sched/gamma1 per-user at the same rate, and sched/gamma1
    per-user at gamma1's aggregate throughput (sched's curve interpolated; None outside its range)."""
    records = {Method(**r["method"]): r["points"] for r in rows.values()}
    out = []
    for m, sched in records.items():
        base = records.get(Method(m.head, "gamma1"))
        if m.policy != "sched" or m.combined or base is None:
            continue
        curve = [{"aggregate": p["tokens_per_s"], "per_user": p["per_user_tokens_per_s"]} for p in sched]
        table = []
        for b, p in zip(base, sched):
            u = per_user_at(curve, b["tokens_per_s"])
            table.append({"rate": b["rate"], "gamma1_tokens_per_s": b["tokens_per_s"],
                          "gamma1_per_user": b["per_user_tokens_per_s"], "sched_tokens_per_s": p["tokens_per_s"],
                          "sched_per_user": p["per_user_tokens_per_s"],
                          "ratio_same_rate": p["per_user_tokens_per_s"] / max(b["per_user_tokens_per_s"], 1e-9),
                          "ratio_matched_throughput": None if u is None else u / max(b["per_user_tokens_per_s"], 1e-9)})
        out.append({"sched": m.name, "gamma1": Method(m.head, "gamma1").name, "rows": table})
    return out
