"""A trained head combined with prompt lookup (inference/combined.py): lossless greedy and sampled
output on the fp32 tiny target with both sources mixed per request in one step, the head's context
kept current on lookup steps, and the `dspark+lookup` bench rows."""
import json

import pytest
import torch

from conftest import compose_cfg, tiny_head
from dspark.core.methods import Method
from dspark.inference import CombinedDrafter, DSparkDrafter, Engine
from dspark.inference.drafters import Drafter, Proposal, RequestState
from dspark.inference.policy import ConfidenceScheduler, VerifyAll
from dspark.inference.verify import target_probs
from test_sampling_distribution import chi2_ok

CODE = ["def add_numbers(first, second):\n    return first + second\n\ndef add_numbers(first, second):\n",
        "hi",
        "for item in items:\n    print(item)\nfor item in items:\n    print(item)\nfor item in"]
MAX_NEW = [30, 24, 27]


class Watched(CombinedDrafter):
    """Records, per step, which sources proposed, and checks the head's context is current."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps = []

    def propose(self, states, limits):
        for s in states:   # the head saw the features of every verified token so far, lookup steps included
            assert self.head._length(s.rid) == len(s.tokens) - 1, "the head's context fell behind"
        before = dict(self.counts)
        out = super().propose(states, limits)
        self.steps.append({k: self.counts[k] - before[k] for k in before})
        return out


@pytest.fixture(scope="module")
def code_prompts(tiny_target):
    return [tiny_target.encode_chat(t) for t in CODE]


@pytest.fixture(scope="module")
def plain(tiny_target, code_prompts):
    return Engine(tiny_target).generate(code_prompts, MAX_NEW).outputs


def combined(target, temperature=0.0, **kw):
    return Watched(DSparkDrafter(tiny_head(target, "markov", draft_vocab=200), target, temperature=temperature), **kw)


@pytest.mark.parametrize("policy", ["all", "sched"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_combined_equals_plain_and_uses_both_sources(tiny_target, code_prompts, plain, batch, policy):
    drafter = combined(tiny_target)
    outs = []
    for start in range(0, 3, batch):
        # draft_cost=0: the tiny head's measured time would dwarf this toy step cost and stop drafting
        pol = VerifyAll() if policy == "all" else ConfidenceScheduler(lambda r, w: 1e-3 * (1 + 0.05 * r * w),
                                                                     draft_cost=0.0)
        res = Engine(tiny_target, drafter, policy=pol, gamma=4).generate(
            code_prompts[start:start + batch], MAX_NEW[start:start + batch])
        outs += res.outputs
    assert outs == plain, f"combined drafter R={batch} {policy} diverged from plain greedy"
    assert drafter.counts["lookup"] > 0 and drafter.counts["head"] > 0, drafter.counts
    if batch == 3:   # both sources in one step: per-request mixing is exercised
        assert any(s["lookup"] and s["head"] for s in drafter.steps)
    assert not drafter.pending and not drafter.head.kv and not drafter.lookup._index   # all finished
    assert drafter.head_time.n > 0 and drafter.rest_time.n > 0 and drafter.head_cost() > 0   # measured as it ran


def test_lookup_confidences_follow_the_running_rates(tiny_target):
    """Lookup blocks report ĉ per position (prior before any outcome, then the observed survival
    rates); outcomes are read from what the target emitted."""
    r = combined(tiny_target).lookup_rates
    assert r.rates(2, 3) == [0.5] * 3 and r.expected(2, 2) == 0.5 + 0.25
    r.observe(2, [5, 6, 7], [5, 9])              # position 1 survived, position 2 failed, 3 never tried
    assert (r.rate(2, 0), r.rate(2, 1), r.rate(2, 2)) == (2 / 3, 1 / 3, 0.5)
    r.observe(2, [5, 6], [5, 6, 4])              # a cut block whose cut position matched counts as survived
    assert r.rate(2, 1) == (1 + 1) / (2 + 2)


def test_sampling_with_mixed_sources_matches_target_distribution(tiny_target, code_prompts):
    """Two prompts in one batch, the first two sampled tokens of each follow the target's distribution
    while lookup (point mass) and head (its q) blocks are verified side by side."""
    temp, top_p = 1.3, 0.95
    prompts = [code_prompts[0], code_prompts[1]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            logits = tiny_target.model(torch.tensor([prompt])).logits[0, -1]
            p1 = target_probs(logits, temp, top_p)
            support = (p1 > 0).nonzero()[:, 0]
            ext = torch.cat([torch.tensor([prompt]).expand(len(support), -1), support[:, None]], 1)
            p2 = (p1[support, None] * target_probs(tiny_target.model(ext).logits[:, -1], temp, top_p)).sum(0)
            expected.append((p1, p2))
    drafter = combined(tiny_target, temperature=temp)
    engine = Engine(tiny_target, drafter, gamma=3, temperature=temp, top_p=top_p)
    counts = [[torch.zeros(tiny_target.vocab_size) for _ in range(2)] for _ in prompts]
    n = 120
    for seed in range(8):
        res = engine.generate([prompts[0]] * n + [prompts[1]] * n, 3, seed=seed, eos_token_ids=[])
        for i, out in enumerate(res.outputs):
            counts[i // n][0][out[0]] += 1
            counts[i // n][1][out[1]] += 1
    assert res.summary()["drafted"] > 0
    assert any(s["lookup"] and s["head"] for s in drafter.steps), "no step mixed the two sources"
    for got, want in zip(counts, expected):
        for c, p in zip(got, want):
            stat, crit = chi2_ok(c, p)
            assert stat < crit, (stat, crit)


def test_method_records_of_combined_rows():
    for name, method in {"dspark+lookup": Method("dspark", "all", combined="lookup"),
                         "dspark+lookup+sched@R2": Method("dspark", "sched", 2, "lookup"),
                         "dspark:prev+lookup+gamma1": Method("dspark:prev", "gamma1", combined="lookup")}.items():
        assert method.name == name and Method.of_row(name, {}) == method
        assert Method.of_row("x", {"method": method.to_json()}) == method
    assert Method("dspark", "all").to_json() == {"head": "dspark", "policy": "all", "concurrency": 1}
    assert Method.of_row("x", {"method": {"head": "dspark", "policy": "sched", "concurrency": 1}}) == \
        Method("dspark", "sched")


def test_policy_setting_accepts_the_lookup_prefix(tmp_path):
    from dspark.settings import check
    from dspark.core.errors import DSparkError

    check("bench", compose_cfg("bench", "target=tiny", f"output_dir={tmp_path}", "policies=[all,lookup,lookup+sched]"))
    with pytest.raises(DSparkError, match="policies"):
        check("bench", compose_cfg("bench", "target=tiny", f"output_dir={tmp_path}", "policies=[lookup+bogus]"))


def test_bench_runs_the_combined_method(tiny_target, tmp_path):
    from dspark.eval import bench

    tiny_head(tiny_target, "markov", draft_vocab=200).save_pretrained(tmp_path / "head")
    out = tmp_path / "b"
    bench.run(compose_cfg("bench", "target=tiny", f"output_dir={out}", f"head={tmp_path / 'head'}",
                          "prompts.limit=2", "max_new_tokens=16", "methods=[plain]",
                          "policies=[all,lookup,lookup+sched]", f"sched.profile_dir={tmp_path / 'profiles'}",
                          "sched.profile_repeats=1"))
    d = json.loads((out / "bench.json").read_text())
    assert set(d["methods"]) == {"plain", "dspark", "dspark+lookup", "dspark+lookup+sched"}
    assert d["methods"]["dspark+lookup+sched"]["method"] == {"head": "dspark", "policy": "sched", "concurrency": 1,
                                                             "combined": "lookup"}
    assert d["methods"]["dspark"]["method"] == {"head": "dspark", "policy": "all", "concurrency": 1}
    assert all(m["identical_to_plain"] for m in d["methods"].values())
    assert d["methods"]["dspark+lookup"]["drafted"] > 0
    assert "| dspark+lookup+sched |" in (out / "bench.md").read_text()


class SevenHead(Drafter):
    """A stand-in head that proposes 7s and counts its calls."""

    def __init__(self):
        self.calls = 0

    def propose(self, states, limits):
        self.calls += 1
        return [Proposal(tokens=[7] * n, confidences=[0.5] * n) for n in limits]


def test_the_source_rule_charges_the_heads_proposal_time():
    """Lookup E = 0.5 + 0.25 (the prior) and head E = 0.9 + 0.45 expected accepted tokens: the head is
    more accurate, so it proposes when it is free (head_cost=0: 1.75 < 2.35), but not when its proposal
    costs half a step (1.75 ≥ 2.35 / 1.5); a request the head already drafts for lets the others ride
    along (cost 0)."""
    def state(rid, toks):
        return RequestState(rid=rid, tokens=toks, n_prompt=len(toks), max_new_tokens=16)

    def rates(d):
        for _ in range(8):   # the head's position-1 rate → (8 + 1) / (8 + 2) = 0.9; position 2 keeps the prior
            d.head_rates.observe("head", [1], [1])
        return d

    repeat = [1, 2, 3, 4, 1, 2]   # "1 2" occurred before: a 2-gram match proposing [3, 4]
    for cost, source in [(0.0, "head"), (0.5, "lookup")]:
        d = rates(CombinedDrafter(SevenHead(), head_cost=cost))
        out = d.propose([state(0, repeat)], [2])
        assert d.counts == {"lookup": int(source == "lookup"), "head": int(source == "head")}, (cost, d.counts)
        assert out[0].tokens == ([3, 4] if source == "lookup" else [7, 7])
    d = rates(CombinedDrafter(SevenHead(), head_cost=0.5))
    out = d.propose([state(0, repeat), state(1, [5, 6, 8])], [2, 2])   # the second has no match: the head runs
    assert d.head.calls == 1 and out[0].tokens == [7, 7] and out[1].tokens == [7, 7], out
    with pytest.raises(ValueError, match="head_cost"):
        CombinedDrafter(SevenHead(), head_cost=-1)
