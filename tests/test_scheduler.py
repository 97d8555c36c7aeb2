"""The confidence scheduler (paper Algorithm 1) and the comparison policies: optimal prefixes on
hand-made tables, the lossless early stop, exactness with the scheduler on, the step-cost profile."""
import json
import random

import pytest
import torch

from conftest import tiny_head
from dspark.inference import DSparkDrafter, Engine, Proposal
from dspark.inference.policy import (ConfidenceScheduler, FixedLength, StaticThreshold, VerifyAll, make_policy,
                                     parse_policy, survival)
from dspark.inference.profile import StepCost, step_cost_profile
from dspark.inference.verify import target_probs
from test_sampling_distribution import chi2_ok


def props(confs):
    return [Proposal(tokens=list(range(len(c))), confidences=list(c)) for c in confs]


def table_cost(table):
    """cost(R, T) from {R: [cost at T=1, 2, …]} (no interpolation needed in these tests)."""
    return lambda r, t: table[r][t - 1]


def choose(policy, confs, limits=None):
    limits = limits or [len(c) for c in confs]
    return policy.choose([None] * len(confs), props(confs), limits)


def brute_best_width(confs, cost):
    """Column unit: Θ for every common width; (best width, Θ per width)."""
    r = len(confs)
    thetas = []
    for w in range(1, max(len(c) for c in confs) + 2):
        tau = r + sum(sum(survival(p, w - 1)) for p in props(confs))
        thetas.append(tau / cost(r, w))
    return thetas


def test_single_request_picks_the_best_prefix():
    cost = table_cost({1: [1.0, 1.1, 1.2, 1.3, 1.4]})
    confs = [[0.9, 0.8, 0.5, 0.1]]
    # Θ(ℓ): 1.00, 1.73, 2.18, 2.29, 2.15 → verify 3 drafts
    for unit in ("column", "position"):
        assert choose(ConfidenceScheduler(cost, unit=unit, draft_cost=0.0), confs) == [3]
    thetas = brute_best_width(confs, cost)
    assert max(range(len(thetas)), key=thetas.__getitem__) == 3


def test_early_stop_is_not_a_global_search():
    """A weak first draft followed by sure ones: the global optimum verifies all four, but the
    decision to verify position 1 must not look at positions 2..4, so the scheduler stops at 0."""
    cost = table_cost({1: [1.0, 1.5, 1.6, 1.7, 1.8]})
    confs = [[0.4, 1.0, 1.0, 1.0]]
    thetas = brute_best_width(confs, cost)
    assert max(range(len(thetas)), key=thetas.__getitem__) == 4     # global search would verify 4
    for unit in ("column", "position"):
        assert choose(ConfidenceScheduler(cost, unit=unit, draft_cost=0.0), confs) == [0]


def test_column_unit_admits_positions_for_all_requests_together():
    # two rows, width costs: 1 → 2.0, 2 → 2.4, 3 → 3.5
    cost = table_cost({2: [2.0, 2.4, 3.5, 4.0]})
    confs = [[0.9, 0.5, 0.5], [0.3, 0.1, 0.1]]
    # width 1: 2/2 = 1.0; width 2: (2 + 1.2)/2.4 = 1.33; width 3: (3.2 + 0.45 + 0.03)/3.5 = 1.05 → stop at 2
    padded = dict(unit="column", packed=False)
    assert choose(ConfidenceScheduler(cost, draft_cost=0.0, **padded), confs) == [1, 1]
    # a bigger per-step overhead (draft time) makes longer verification relatively cheaper
    assert choose(ConfidenceScheduler(cost, draft_cost=10.0, **padded), confs) == [3, 3]


def test_position_unit_walks_by_decreasing_survival_then_fills_the_width():
    # cost by width only; admitting (0,0) a=0.9 widens to 2: (2.9)/2.2 = 1.318 > 2/2 = 1.0;
    # (0,1) a=0.72 widens to 3: (3.62)/3.0 = 1.207 < 1.318 → stop. Row 1 fills the width: ℓ = 1.
    cost = table_cost({2: [2.0, 2.2, 3.0, 3.1]})
    confs = [[0.9, 0.8, 0.9], [0.2, 0.9, 0.9]]
    assert choose(ConfidenceScheduler(cost, unit="position", draft_cost=0.0, packed=False), confs) == [1, 1]


def test_packed_position_walk_pays_per_verified_token():
    """Packed verification (the default): a step costs cost(R, B / R) for B verified tokens, so a row
    verifies only what it admitted, and a sure draft of one row does not drag the other along."""
    cost = table_cost({2: [2.0, 2.2, 3.0, 3.1]})
    confs = [[0.9, 0.8, 0.9], [0.2, 0.9, 0.9]]
    # B=3 (width 1.5): 2.1 → Θ 2.9/2.1 = 1.381 > 1.0; (0,1) a=0.72, B=4: 2.2 → 3.62/2.2 = 1.645;
    # (0,2) a=0.648, B=5: 2.6 → 4.268/2.6 = 1.642 < 1.645 → stop: row 0 verifies 2, row 1 nothing
    assert choose(ConfidenceScheduler(cost, draft_cost=0.0), confs) == [2, 0]
    from dspark.inference.profile import packed_cost
    assert packed_cost(cost, 2, 3) == pytest.approx(2.1) and packed_cost(cost, 2, 4) == cost(2, 2)


def test_comparison_policies():
    confs = [[0.9, 0.6, 0.2], [0.4, 0.9]]
    assert choose(VerifyAll(), confs) == [3, 2]
    assert choose(VerifyAll(), confs, limits=[1, 5]) == [1, 2]
    assert choose(FixedLength(1), confs) == [1, 1]
    # cumulative survival 0.9, 0.54, 0.108 | 0.4, 0.36
    assert choose(StaticThreshold(0.5), confs) == [2, 0]
    assert make_policy("gamma1").name == "gamma1" and make_policy("all").name == "all"
    with pytest.raises(ValueError):
        make_policy("sched")          # needs a cost profile
    with pytest.raises(ValueError, match="confidences"):
        StaticThreshold().choose([None], [Proposal(tokens=[1, 2])], [2])


def test_policy_names_are_checked_in_one_place():
    """`parse_policy` is the grammar: `make_policy` and the settings check (cli/settings.py) both ask it."""
    from dspark.settings import Policy

    assert parse_policy("gamma12") == ("gamma", 12) and make_policy("gamma12").n == 12
    for name in ("all", "sched", "threshold", "gamma1"):
        assert Policy().ok(name) and make_policy(name, step_cost=tiny_cost()).name == name
    for bad in ("gamma0", "gamma", "gamma-1", "gammax", "fastest", "", None, 3):
        assert not Policy().ok(bad), bad
        with pytest.raises(ValueError, match="unknown policy"):
            make_policy(bad, step_cost=tiny_cost())


def random_cost(rng, rows, width):
    table = {}
    for r in rows:
        base, per = rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.6)
        table[r] = [base + per * r * (t - 1) ** rng.uniform(0.7, 1.3) for t in range(1, width + 1)]
    return table_cost(table)


@pytest.mark.parametrize("policy_name", ["column", "position", "position-padded", "threshold"])
def test_decision_for_position_k_ignores_later_positions(policy_name):
    """The lossless rule: whether position k of request r is verified must not change when r's
    confidences after k change (they depend on r's draft tokens at and after k)."""
    rng = random.Random(0)
    for trial in range(300):
        r, g = rng.randint(1, 4), rng.randint(1, 6)
        cost = random_cost(rng, [r], g + 1)
        policy = (StaticThreshold(rng.uniform(0.2, 0.8)) if policy_name == "threshold" else
                  ConfidenceScheduler(cost, unit=policy_name.split("-")[0], draft_cost=rng.uniform(0, 1),
                                      packed=policy_name != "position-padded"))
        confs = [[rng.random() ** 0.3 for _ in range(g)] for _ in range(r)]
        limits = [rng.randint(0, g) for _ in range(r)]
        base = choose(policy, confs, limits)
        assert all(0 <= n <= lim for n, lim in zip(base, limits))
        who, k = rng.randrange(r), rng.randint(1, g)
        changed = [list(c) for c in confs]
        changed[who][k:] = [rng.random() for _ in range(g - k)]
        new = choose(policy, changed, limits)
        # the rule is per request: "position pos of `who` is verified", pos ≤ k, must not change. The packed
        # walk may move other requests (their decisions may depend on anything about `who`, whose drafts
        # are independent of theirs); the other policies keep even those fixed.
        for i in ([who] if policy_name == "position" else range(r)):
            for pos in range(1, k + 1):
                assert (base[i] >= pos) == (new[i] >= pos), (trial, confs, changed, base, new, who, i, k)


def test_scheduler_verifies_less_under_load_with_the_design_cost_model():
    """docs/design.md §4 cost: 22.4 + 0.55·R·T + 1.14·R ms. Same moderate confidences: long blocks at R=1,
    shorter ones at R=32, never longer."""
    cost = lambda r, t: 22.4 + 0.55 * r * t + 1.14 * r   # noqa: E731
    conf = [0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5]
    lengths = {r: choose(ConfidenceScheduler(cost, draft_cost=5.0), [conf] * r)[0] for r in (1, 4, 32)}
    assert lengths[1] >= lengths[4] >= lengths[32] and lengths[1] > lengths[32]


@pytest.fixture(scope="module")
def plain_outputs(tiny_target, tiny_prompts):
    return Engine(tiny_target).generate(tiny_prompts, 30).outputs


def tiny_cost():
    return StepCost({1: [1.0, 1.02, 1.05, 1.1, 1.2, 1.3], 3: [1.5, 1.6, 1.75, 1.9, 2.1, 2.3]})


@pytest.mark.parametrize("unit", ["column", "position"])
def test_greedy_output_is_plain_with_the_scheduler(tiny_target, tiny_prompts, plain_outputs, unit):
    head = tiny_head(tiny_target, "markov", draft_vocab=200)
    for batch in (1, 3):
        policy = ConfidenceScheduler(tiny_cost(), unit=unit)
        engine = Engine(tiny_target, DSparkDrafter(head, tiny_target), policy=policy, gamma=5)
        outs = []
        for start in range(0, 3, batch):
            outs += engine.generate(tiny_prompts[start:start + batch], 30).outputs
        assert outs == plain_outputs, (unit, batch)


@pytest.mark.parametrize("unit", ["column", "position"])
def test_sampling_matches_target_distribution_with_the_scheduler(tiny_target, tiny_prompts, unit):
    prompt, temp = tiny_prompts[1], 1.3
    with torch.no_grad():
        logits = tiny_target.model(torch.tensor([prompt])).logits[0, -1]
        p1 = target_probs(logits, temp, 1.0)
        ext = torch.cat([torch.tensor([prompt]).expand(tiny_target.vocab_size, -1),
                         torch.arange(tiny_target.vocab_size)[:, None]], 1)
        p2 = (p1[:, None] * target_probs(tiny_target.model(ext).logits[:, -1], temp, 1.0)).sum(0)
    head = tiny_head(tiny_target, "markov", draft_vocab=200,
                     confidence_temperatures=[0.3])          # spread confidences so decisions vary
    # the column unit weighs a whole column's gain against the widening; the position unit one draft's
    widen = [1.0, 1.3, 1.6, 1.9] if unit == "column" else [1.0, 1.001, 1.002, 1.003]
    cost = StepCost({1: widen, 200: widen})
    engine = Engine(tiny_target, DSparkDrafter(head, tiny_target, temperature=temp),
                    policy=ConfidenceScheduler(cost, unit=unit, draft_cost=0.0), gamma=3, temperature=temp)
    first, second = torch.zeros(tiny_target.vocab_size), torch.zeros(tiny_target.vocab_size)
    drafted = 0
    for seed in range(10):
        res = engine.generate([prompt] * 200, 2, seed=seed, eos_token_ids=[])
        drafted += res.summary()["drafted"]
        for out in res.outputs:
            first[out[0]] += 1
            second[out[1]] += 1
    assert drafted > 0
    for counts, probs in ((first, p1), (second, p2)):
        stat, crit = chi2_ok(counts, probs)
        assert stat < crit, (stat, crit)


def test_step_cost_interpolates_between_profiled_rows():
    cost = StepCost({1: [1.0, 2.0], 4: [4.0, 8.0]})
    assert cost(1, 2) == 2.0 and cost(4, 1) == 4.0
    assert cost(2, 1) == pytest.approx(2.0) and cost(2, 2) == pytest.approx(4.0)
    assert cost(1, 3) == pytest.approx(3.0)          # linear in T beyond the table
    assert cost(8, 1) == pytest.approx(8.0)          # extrapolated from the last two rows


def test_profile_is_cached_per_machine_target_dtype(tiny_target, tmp_path, monkeypatch):
    import dspark.inference.profile as prof

    first = step_cost_profile(tiny_target, 2, 3, tmp_path, context=16, repeats=1)
    files = list(tmp_path.glob("step-cost-*.json"))
    assert len(files) == 1 and set(first.rows) == {1, 2}
    saved = json.loads(files[0].read_text())
    assert saved["meta"]["dtype"] == "float32" and "tiny" in saved["meta"]["target"]
    assert all(len(row) == 3 and all(c > 0 for c in row) for row in saved["table"].values())

    def fail(*a, **k):
        raise AssertionError("should have used the cached profile")

    monkeypatch.setattr(prof, "measure", fail)
    again = step_cost_profile(tiny_target, 2, 3, tmp_path, context=16, repeats=1)
    assert again.table == first.table
    with pytest.raises(AssertionError):               # on demand, or when the cache does not cover the shapes
        step_cost_profile(tiny_target, 2, 3, tmp_path, context=16, repeats=1, reprofile=True)
    with pytest.raises(AssertionError):
        step_cost_profile(tiny_target, 4, 3, tmp_path, context=16, repeats=1)


def test_scheduler_drafts_only_when_its_prediction_pays(tiny_target, tiny_prompts, plain_outputs):
    cost = table_cost({1: [1.0, 1.5, 2.0]})
    sched = ConfidenceScheduler(cost, draft_cost=5.0)      # drafting costs 5 plain steps: never pays
    assert sched.draft_rows([None]) == [True]              # nothing seen yet: a probe
    choose(sched, [[0.9, 0.9]])
    waits = [sched.draft_rows([None]) for _ in range(sched.probe_every)]
    assert waits == [[False]] * (sched.probe_every - 1) + [[True]]   # then a probe, however bleak the estimate
    cheap = ConfidenceScheduler(cost, draft_cost=0.1)
    choose(cheap, [[0.9, 0.9]])
    assert cheap.draft_rows([None]) == [True]
    # a request whose latest block was hopeless waits, and after max_age steps is predicted by the mean again
    cheap_one = ConfidenceScheduler(cost, draft_cost=0.1, max_age=2)
    for _ in range(3):
        choose(cheap_one, [[0.9, 0.9]])
    choose(cheap_one, [[0.01, 0.01]])
    assert [cheap_one.draft_rows([None]) for _ in range(3)] == [[False], [False], [True]]
    # in the engine: far fewer drafting steps, same greedy output
    head = tiny_head(tiny_target, "markov", draft_vocab=200)
    res = Engine(tiny_target, DSparkDrafter(head, tiny_target), gamma=5,
                 policy=ConfidenceScheduler(tiny_cost(), draft_cost=100.0)).generate(tiny_prompts, 30)
    every = Engine(tiny_target, DSparkDrafter(head, tiny_target), gamma=5).generate(tiny_prompts, 30)
    assert res.outputs == plain_outputs
    assert res.summary()["drafted"] < 0.6 * every.summary()["drafted"]


def test_under_load_only_the_most_confident_rows_draft():
    """Eight rows: a proposal for all of them costs more than it returns, one for the confident row alone pays."""
    cost = table_cost({8: [8.0, 10.0, 12.0, 14.0]})
    sched = ConfidenceScheduler(cost)
    sched.observe_draft_time(0.5, rows=1)
    sched.observe_draft_time(6.0, rows=8)
    confs = [[0.3, 0.3, 0.3]] * 7 + [[0.95, 0.95, 0.95]]
    choose(sched, confs)
    assert sched.draft_rows([None] * 8) == [False] * 7 + [True]
    # in the step it drafts, the walk verifies that row's block only
    proposals = props([[]] * 7 + [[0.95, 0.95, 0.95]])
    assert sched.choose([None] * 8, proposals, [0] * 7 + [3]) == [0] * 7 + [3]


def test_draft_cost_is_tracked_per_number_of_rows():
    """A proposal for many rows costs more than for one: the scheduler weighs each batch size with the
    drafting time observed at that size (interpolated between the sizes seen when it has not seen it)."""
    cost = table_cost({1: [1.0, 1.1, 1.2], 8: [4.0, 5.0, 6.0]})
    sched = ConfidenceScheduler(cost)
    assert sched.draft_cost(3) == 0.0                        # nothing observed yet
    for seconds in (0.1, 0.3):
        sched.observe_draft_time(seconds, rows=1)
    sched.observe_draft_time(3.0, rows=8)
    assert sched.draft_cost(1) == pytest.approx(0.2) and sched.draft_cost(8) == 3.0
    assert sched.draft_cost(3) == pytest.approx(0.2 + 2.8 * 2 / 7) and sched.draft_cost(16) == 3.0
    confs = [[0.7, 0.7]]
    assert choose(sched, confs) == [2] and sched.draft_rows([None]) == [True]   # one row: drafting pays
    # eight rows: 3 s of drafting for all does not pay back (a mean over all sizes, 1.13 s, would say it
    # does); 0.2 s for one row does
    choose(sched, confs * 8)
    assert sched.draft_rows([None] * 8) == [True] + [False] * 7
