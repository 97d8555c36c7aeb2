"""`dspark bench` with `load.rates` (eval/arrivals.py): Poisson arrivals joining the running batch, on the
fp32 tiny target — the same seeded arrival times for every method, outputs equal to plain greedy, and
the bench.json `arrivals` section, table and plot."""
import json
import math
import statistics

import pytest

from conftest import compose_cfg, tiny_head
from dspark.eval.arrivals import arrival_times, quantile, sched_vs_gamma1

RATES = [8.0, 1000.0]   # gaps of ≈ 0.12 s (requests run alone, mostly) and ≈ 1 ms (they queue)
REQUESTS, MAX_BATCH, MAX_NEW = 5, 2, 12


def test_arrival_times_are_seeded_poisson():
    a = arrival_times(4000, 2.0, seed=3)
    assert a == arrival_times(4000, 2.0, seed=3) and a != arrival_times(4000, 2.0, seed=4)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = statistics.fmean(gaps)
    assert abs(mean - 0.5) < 0.05                                          # mean gap 1/rate
    assert abs(statistics.pstdev(gaps) / mean - 1) < 0.1                   # exponential: std = mean
    assert abs(sum(g < 0.5 * math.log(2) for g in gaps) / len(gaps) - 0.5) < 0.05   # its median
    b = arrival_times(4000, 8.0, seed=3)     # another rate: the same unit gaps, scaled
    assert all(abs(x / 4 - y) < 1e-9 for x, y in zip(a, b))
    assert arrival_times(1, 5.0, 0) == [0.0]


def test_quantile_and_the_sched_vs_gamma1_summary():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0 and quantile([1.0, 2.0], 0.9) == pytest.approx(1.9)
    assert quantile([4.0], 0.9) == 4.0

    def row(head, policy, pts):
        return {"method": {"head": head, "policy": policy, "concurrency": 1},
                "points": [{"rate": r, "tokens_per_s": a, "per_user_tokens_per_s": u} for r, a, u in pts]}

    rows = {"dspark+gamma1": row("dspark", "gamma1", [(1, 100, 50), (2, 200, 40)]),
            "dspark+sched": row("dspark", "sched", [(1, 110, 60), (2, 190, 44)]), "plain": row(None, None, [])}
    [cmp] = sched_vs_gamma1(rows)
    assert cmp["sched"] == "dspark+sched" and cmp["gamma1"] == "dspark+gamma1"
    first, second = cmp["rows"]
    assert first["ratio_same_rate"] == pytest.approx(60 / 50) and second["ratio_same_rate"] == pytest.approx(44 / 40)
    assert first["ratio_matched_throughput"] is None          # 100 tok/s is below sched's curve
    assert second["ratio_matched_throughput"] is None          # 200 tok/s is above it
    rows["dspark+sched"] = row("dspark", "sched", [(1, 90, 60), (2, 210, 48)])
    [cmp] = sched_vs_gamma1(rows)
    assert cmp["rows"][0]["ratio_matched_throughput"] == pytest.approx((60 - 12 * 10 / 120) / 50)
    del rows["dspark+gamma1"]
    assert sched_vs_gamma1(rows) == []


@pytest.fixture(scope="module")
def arrivals_run(tmp_path_factory, tiny_target):
    """One in-process bench with every kind of runtime method under arrivals; every `generate` call that
    had arrivals is recorded with the method it ran."""
    from dspark.eval import bench as bench_mod
    from dspark.inference.engine import Engine

    tmp = tmp_path_factory.mktemp("arrivals")
    tiny_head(tiny_target, "markov", draft_vocab=200).save_pretrained(tmp / "head")
    cfg = compose_cfg("bench", "target=tiny", f"output_dir={tmp / 'out'}", f"head={tmp / 'head'}", "prompts.limit=3",
                      f"max_new_tokens={MAX_NEW}", "ignore_eos=true", "gamma=4",
                      "methods=[plain,oracle,prompt_lookup,hf_prompt_lookup]", "policies=[all,sched,gamma1]",
                      f"load.rates=[{RATES[0]},{RATES[1]}]", f"load.requests={REQUESTS}", f"load.max_batch={MAX_BATCH}",
                      "load.seed=7", f"sched.profile_dir={tmp / 'profiles'}")
    calls, method_of = [], {}
    make, generate = bench_mod.Bench.engine, Engine.generate
    mp = pytest.MonkeyPatch()

    def engine(self, method, record=False):
        e = make(self, method, record)
        method_of[id(e)] = method.name
        return e

    def spy(self, prompts, max_new_tokens, **kw):
        res = generate(self, prompts, max_new_tokens, **kw)
        if kw.get("arrivals") is not None:
            calls.append({"method": method_of[id(self)], "prompts": prompts, "kw": kw, "res": res})
        return res

    mp.setattr(bench_mod.Bench, "engine", engine)
    mp.setattr(Engine, "generate", spy)
    try:
        bench_mod.run(cfg)
    finally:
        mp.undo()
    return tmp / "out", calls


def test_every_method_gets_the_same_seeded_arrivals(arrivals_run):
    out, calls = arrivals_run
    methods = {"plain", "oracle", "prompt_lookup", "dspark", "dspark+sched", "dspark+gamma1"}   # no Hugging Face
    assert len(calls) == len(methods) * len(RATES)
    for k, rate in enumerate(RATES):
        at_rate = calls[k * len(methods):(k + 1) * len(methods)]
        assert {c["method"] for c in at_rate} == methods
        for c in at_rate:
            assert c["kw"]["arrivals"] == arrival_times(REQUESTS, rate, 7), c["method"]
            assert c["kw"]["arrival_unit"] == "s" and c["kw"]["max_batch"] == MAX_BATCH
            assert [t.arrival for t in c["res"].timings] == c["kw"]["arrivals"]
    assert calls[len(methods)]["method"] == calls[1]["method"]          # the order rotates per rate


def test_outputs_under_arrivals_are_plain_greedy(arrivals_run, tiny_target):
    from dspark.inference import Engine

    _, calls = arrivals_run
    prompts = calls[0]["prompts"]
    assert len(prompts) == REQUESTS and prompts[3] == prompts[0] and prompts[4] == prompts[1]   # cyclic
    alone = [Engine(tiny_target).generate([p], MAX_NEW, eos_token_ids=[]).outputs[0] for p in prompts]
    for c in calls:
        assert c["res"].outputs == alone, c["method"]
        for t, s in zip(c["res"].timings, c["res"].states):
            assert t.arrival <= t.admitted <= t.first_token <= t.finished and s.done


def test_bench_json_has_the_arrivals_section(arrivals_run):
    out, calls = arrivals_run
    d = json.loads((out / "bench.json").read_text())
    a = d["arrivals"]
    assert a["rates"] == RATES and a["requests"] == REQUESTS and a["max_batch"] == MAX_BATCH and a["seed"] == 7
    assert a["arrival_times"] == [arrival_times(REQUESTS, r, 7) for r in RATES]
    assert set(a["methods"]) == {"plain", "oracle", "prompt_lookup", "dspark", "dspark+sched", "dspark+gamma1"}
    for name, row in a["methods"].items():
        assert [p["rate"] for p in row["points"]] == RATES
        for p in row["points"]:
            assert p["identical_to_plain"] is True and p["divergences"] == 0, name
            assert p["tokens"] == REQUESTS * MAX_NEW
            assert p["wall_s"] >= p["last_arrival_s"] == a["arrival_times"][RATES.index(p["rate"])][-1]
            assert p["tokens_per_s"] == pytest.approx(p["tokens"] / p["wall_s"])
            assert 0 <= p["mean_queue_s"] <= p["mean_ttft_s"] <= p["mean_latency_s"]
        fast = row["points"][1]          # at ≈ 1000 req/s all arrive at once: all but MAX_BATCH must queue
        assert fast["mean_queue_s"] > 0, name
    per_call = {(c["method"], c["kw"]["arrivals"][-1]): c["res"] for c in calls}
    for name, row in a["methods"].items():
        for p in row["points"]:
            res = per_call[(name, p["last_arrival_s"])]
            lat = sorted(t.finished - t.arrival for t in res.timings)
            assert lat[0] <= p["p90_latency_s"] <= lat[-1] and lat[-1] >= p["mean_latency_s"]
            # a request's decode is part of its latency: per-user speed >= tokens / latency >= tokens / max latency
            assert p["per_user_tokens_per_s"] >= MAX_NEW / lat[-1]
            assert p["mean_latency_s"] == pytest.approx(statistics.fmean(lat))
            assert p["per_user_tokens_per_s"] == pytest.approx(statistics.fmean(
                MAX_NEW / (t.finished - t.admitted) for t in res.timings))
    [cmp] = a["sched_vs_gamma1"]
    assert cmp["sched"] == "dspark+sched" and [r["rate"] for r in cmp["rows"]] == RATES
    md = (out / "bench.md").read_text()
    assert "Arrivals: 5 requests per rate" in md and "| dspark+sched | 1000 |" in md
    assert "dspark+sched vs dspark+gamma1 under arrivals" in md
    assert (out / "arrivals.png").stat().st_size > 1000 and d["plots"]["arrivals"].endswith("arrivals.png")


def test_no_rates_no_arrivals(tmp_path):
    from dspark.eval.bench import run

    assert list(compose_cfg("bench").load.rates) == []
    run(compose_cfg("bench", "target=tiny", f"output_dir={tmp_path}", "head=null", "prompts.limit=1",
                    "max_new_tokens=4", "methods=[plain]"))
    d = json.loads((tmp_path / "bench.json").read_text())
    assert "arrivals" not in d and "arrivals" not in d["plots"] and not (tmp_path / "arrivals.png").exists()
