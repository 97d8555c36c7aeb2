"""Continuous batching (fp32 tiny target): a request's output is its one-at-a-time output whatever
joins the batch when — plain, speculative (every drafter kind, the scheduler), sampled with its own
seed — and requests that arrive later join a running batch (rows reused, rows added, the cache widened)."""
import pytest
import torch

from conftest import tiny_head
from dspark.core.errors import DSparkError
from dspark.inference import (Eagle3Drafter, Engine, OracleDrafter, PromptLookupDrafter, RandomDrafter,
                              drafter_for)
from dspark.inference.policy import ConfidenceScheduler
from dspark.inference.profile import StepCost
from test_eagle3 import tiny_eagle3_head

TEXTS = ["hi", "Write a function that adds two numbers, then explain it.",
         "def fib(n):\n    # return the n-th Fibonacci number\n", "Tell me a story about dragons and knights.",
         "1 2 3 4 5", "What is the capital of France? Answer briefly, then give one fact about it."]
MAX_NEW = [31, 9, 24, 40, 5, 17, 12, 20]   # different finish times, so requests join all the time


@pytest.fixture(scope="module")
def prompts(tiny_target):
    """Eight prompts of very different lengths: chat prompts, a 1-token one (nothing to prefill) and a
    long one (wider than the batch it joins, so the shared cache must widen)."""
    chat = [tiny_target.encode_chat(t) for t in TEXTS]
    return chat[:4] + [[7]] + chat[4:] + [tiny_target.encode_chat("long " * 60)]


@pytest.fixture(scope="module")
def alone(tiny_target, prompts):
    """Every request decoded by itself (plain greedy)."""
    return [Engine(tiny_target).generate([p], m).outputs[0] for p, m in zip(prompts, MAX_NEW)]


def test_alone_is_hugging_face_greedy(tiny_target, prompts, alone):
    from test_runtime_lossless import hf_greedy

    assert alone[-1] == hf_greedy(tiny_target, prompts[-1], MAX_NEW[-1])


@pytest.mark.parametrize("max_batch", [1, 2, 3, None])
def test_plain_output_is_independent_of_who_joins_when(tiny_target, prompts, alone, max_batch):
    res = Engine(tiny_target).generate(prompts, MAX_NEW, max_batch=max_batch)
    assert res.outputs == alone
    assert res.finish_reasons == ["length"] * len(prompts)
    steps = [t.admitted_step for t in res.timings]
    if max_batch is None:
        assert steps == [0] * len(prompts)
    else:
        assert steps[:max_batch] == [0] * max_batch and min(steps[max_batch:]) > 0   # the rest joined later
    assert all(t.finished >= t.first_token >= t.admitted >= 0 for t in res.timings)
    assert all(0 < v < float("inf") for v in res.stats.per_user_tps)


@pytest.mark.parametrize("max_batch", [3, None])
def test_prefill_in_groups_within_the_token_budget(tiny_target, prompts, alone, monkeypatch, max_batch):
    """Joiners whose rows × longest prompt exceed `prefill_tokens` are prefilled in several forwards
    (longest first; the 1-token prompt too), with the same outputs, speculative included."""
    forwards = []
    real = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, states, cache, stats: (
        forwards.append(max(len(s.tokens) - 1 for s in states) * len(states)) or real(self, states, cache, stats)))
    budget = 2 * max(len(p) for p in prompts)
    for drafter in (None, drafter_for(tiny_head(tiny_target, "markov", draft_vocab=200), tiny_target)):
        forwards.clear()
        res = Engine(tiny_target, drafter, gamma=4, prefill_tokens=budget).generate(prompts, MAX_NEW,
                                                                                    max_batch=max_batch)
        assert res.outputs == alone
        assert all(n <= budget for n in forwards)
        assert len(forwards) > (1 if max_batch is None else 0) and len(forwards) < len(prompts) + 1


def drafters(target):
    return {"prompt_lookup": lambda: PromptLookupDrafter(),
            "dspark": lambda: drafter_for(tiny_head(target, "markov", draft_vocab=200), target),
            "dflash": lambda: drafter_for(tiny_head(target, "none"), target),
            "eagle3": lambda: Eagle3Drafter(tiny_eagle3_head(target, draft_vocab=200), target),
            "oracle": lambda: OracleDrafter(target),
            "random": lambda: RandomDrafter(target.vocab_size, 4, seed=1)}


@pytest.mark.parametrize("kind", ["prompt_lookup", "dspark", "dflash", "eagle3", "oracle", "random"])
def test_speculative_output_is_independent_of_who_joins_when(tiny_target, prompts, alone, kind):
    make = drafters(tiny_target)[kind]
    for max_batch in (1, 2, 3):
        for gamma in (1, 4) if kind in ("dspark", "random") else (4,):
            res = Engine(tiny_target, make(), gamma=gamma).generate(prompts, MAX_NEW, max_batch=max_batch)
            assert res.outputs == alone, f"{kind} γ={gamma} max_batch={max_batch}"
            assert res.summary()["drafted"] > 0


def test_scheduler_policy_with_continuous_batching(tiny_target, prompts, alone):
    cost = StepCost({1: [1.0, 1.02, 1.05, 1.1, 1.2, 1.3], 3: [1.5, 1.6, 1.75, 1.9, 2.1, 2.3]})
    head = tiny_head(tiny_target, "markov", draft_vocab=200)
    for unit in ("column", "position"):
        engine = Engine(tiny_target, drafter_for(head, tiny_target), policy=ConfidenceScheduler(cost, unit=unit),
                        gamma=5)
        assert engine.generate(prompts, MAX_NEW, max_batch=3).outputs == alone, unit


@pytest.mark.parametrize("drafter", [None, "prompt_lookup"])
def test_sampled_output_depends_on_its_own_seed_only(tiny_target, prompts, drafter):
    seeds = [100 + i for i in range(len(prompts))]
    outs = {}
    for max_batch in (1, 3, None):
        engine = Engine(tiny_target, PromptLookupDrafter() if drafter else None, gamma=3, temperature=1.0)
        outs[max_batch] = engine.generate(prompts, MAX_NEW, seed=seeds, max_batch=max_batch,
                                          eos_token_ids=[]).outputs
    assert outs[1] == outs[3] == outs[None]
    assert [len(o) for o in outs[1]] == MAX_NEW
    again = Engine(tiny_target, temperature=1.0).generate(prompts[:1], MAX_NEW[:1], seed=[7], eos_token_ids=[])
    assert again.outputs != outs[1][:1]   # the seed matters


def test_late_arrivals_join_a_running_batch(tiny_target, prompts, alone):
    # in engine steps: 0 and 1 start; 2 arrives while they run (max_batch 2: it waits for a row and
    # reuses it; None: a row is added); the long prompt 7 widens the cache; 6 arrives after an idle gap
    arrivals = [0, 0, 3, 6, 6, 50, 300, 5]
    for max_batch in (2, None):
        res = Engine(tiny_target, PromptLookupDrafter(), gamma=3).generate(
            prompts, MAX_NEW, max_batch=max_batch, arrivals=arrivals, arrival_unit="step")
        assert res.outputs == alone, max_batch
        steps = [t.admitted_step for t in res.timings]
        assert all(s >= a for s, a in zip(steps, arrivals))
        if max_batch is None:
            assert steps == arrivals   # room for everyone: each joins as it arrives
            assert res.timings[0].finished > res.timings[2].admitted   # 2 joined while 0 was running
            assert max(t.finished for t in res.timings[:6]) < res.timings[6].admitted   # 6 came to an idle engine
    # arrivals in seconds: the engine idles until the first request arrives, the second joins later
    res = Engine(tiny_target).generate(prompts[:2], MAX_NEW[:2], arrivals=[0.05, 0.1])
    assert res.outputs == alone[:2]
    assert [t.admitted >= t.arrival for t in res.timings] == [True, True]


def test_cache_after_joins_and_compactions_gives_fresh_logits(tiny_target, prompts):
    """Every emitted token's deciding logits, from rows reused by joining requests, widened and often
    compacted, equal a clean single-sequence forward over the accepted tokens."""
    engine = Engine(tiny_target, RandomDrafter(tiny_target.vocab_size, 5, sharpness=0.5), gamma=5,
                    temperature=1.0, record_logits=True, compact_fraction=0.05)
    res = engine.generate(prompts, MAX_NEW, seed=list(range(len(prompts))), max_batch=3, eos_token_ids=[])
    assert res.summary()["drafted"] > res.summary()["accepted"] > 0
    for s in res.states:
        with torch.no_grad():
            fresh = tiny_target.model(torch.tensor([s.tokens[:-1]])).logits[0, s.n_prompt - 1:]
        torch.testing.assert_close(torch.stack(s.logits), fresh, atol=2e-4, rtol=1e-4)


def test_on_finish_and_eos(tiny_target, prompts, alone):
    eos = alone[3][4]
    cut = alone[3].index(eos) + 1
    seen = []
    res = Engine(tiny_target, PromptLookupDrafter(), gamma=3).generate(
        prompts, MAX_NEW, max_batch=2, eos_token_ids=[eos], on_finish=lambda i, s: seen.append((i, s.generated)))
    assert res.outputs[3] == alone[3][:cut] and res.finish_reasons[3] == "eos"
    assert sorted(i for i, _ in seen) == list(range(len(prompts)))
    assert all(out == res.outputs[i] for i, out in seen)


def test_bad_batching_arguments(tiny_target, prompts):
    engine = Engine(tiny_target)
    for kw, match in (({"max_batch": 0}, "max_batch"), ({"arrivals": [0.0]}, "arrival times"),
                      ({"arrivals": [-1.0] * len(prompts)}, ">= 0"), ({"arrival_unit": "ms"}, "arrival_unit")):
        with pytest.raises(DSparkError, match=match):
            engine.generate(prompts, 4, **kw)


def test_prefill_groups_keep_short_prompts_off_a_long_ones_width():
    """Joiners are grouped to cost least (padded slots + a fixed cost per forward): a long prompt joining
    with short ones gets a forward of its own, similar lengths share one, and the budget still holds."""
    from types import SimpleNamespace

    from dspark.inference.batching import FORWARD_COST_SLOTS, prefill_groups

    def widths(lens, budget=16384):
        return [[len(s.tokens) - 1 for s in g] for g in
                prefill_groups([SimpleNamespace(tokens=[0] * (n + 1)) for n in lens], budget)]

    assert widths([65, 406, 81, 80, 72]) == [[406], [81, 80, 72, 65]]
    assert widths([50] * 16) == [[50] * 16]
    assert widths([50] * 16, budget=200) == [[50] * 4] * 4
    assert widths([FORWARD_COST_SLOTS + 10, 30]) == [[FORWARD_COST_SLOTS + 10, 30]]   # 44 padded slots < a forward
    assert widths([3 * FORWARD_COST_SLOTS, 10]) == [[3 * FORWARD_COST_SLOTS], [10]]
    assert widths([]) == []
