"""The runtime is exact: greedy speculative output == plain greedy, token for token, and the KV cache
after rollbacks gives the same logits as a fresh forward over the accepted sequence (fp32 tiny target)."""
import pytest
import torch

from conftest import tiny_head
from dspark.inference import DSparkDrafter, Eagle3Drafter, Engine, OracleDrafter, PromptLookupDrafter, RandomDrafter
from test_eagle3 import tiny_eagle3_head

MAX_NEW = [37, 20, 29]   # different finish times


def hf_greedy(target, prompt, n):
    ids = torch.tensor([prompt])
    out = target.hf_generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=target.eos_token_ids, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def plain(tiny_target, tiny_prompts):
    return Engine(tiny_target).generate(tiny_prompts, MAX_NEW)


def test_plain_engine_matches_hf_greedy(tiny_target, tiny_prompts, plain):
    assert plain.outputs == [hf_greedy(tiny_target, p, n) for p, n in zip(tiny_prompts, MAX_NEW)]
    assert [len(o) for o in plain.outputs] == MAX_NEW
    assert plain.summary()["tau"] == 1.0


def drafters(target, gamma):
    return {"oracle": OracleDrafter(target), "prompt_lookup": PromptLookupDrafter(),
            "random": RandomDrafter(target.vocab_size, gamma, seed=gamma),
            "dspark_markov": DSparkDrafter(tiny_head(target, "markov", draft_vocab=200), target),
            "dspark_rnn": DSparkDrafter(tiny_head(target, "rnn"), target),
            "dflash": DSparkDrafter(tiny_head(target, "none"), target),
            "eagle3": Eagle3Drafter(tiny_eagle3_head(target, draft_vocab=200), target)}


@pytest.mark.parametrize("gamma", [1, 4, 7])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_equals_plain(tiny_target, tiny_prompts, plain, gamma, batch):
    for name, drafter in drafters(tiny_target, gamma).items():
        outs = []
        for start in range(0, 3, batch):
            res = Engine(tiny_target, drafter, gamma=gamma).generate(
                tiny_prompts[start:start + batch], MAX_NEW[start:start + batch])
            outs += res.outputs
        assert outs == plain.outputs, f"{name} γ={gamma} R={batch} diverged from plain greedy"


def test_oracle_accepts_everything_and_random_almost_nothing(tiny_target, tiny_prompts):
    oracle = Engine(tiny_target, OracleDrafter(tiny_target), gamma=7).generate(tiny_prompts, MAX_NEW).summary()
    assert oracle["acceptance_rate"] == 1.0
    # τ: each step emits min(8, remaining) tokens
    steps = sum(-(-n // 8) for n in MAX_NEW)
    assert oracle["target_forwards"] <= steps and abs(oracle["tau"] - sum(MAX_NEW) / steps) < 1e-9
    rnd = Engine(tiny_target, RandomDrafter(tiny_target.vocab_size, 4), gamma=4).generate(
        tiny_prompts, MAX_NEW).summary()
    assert rnd["acceptance_rate"] < 0.2 and rnd["drafted"] > 0


def test_eos_finishes_requests_early(tiny_target, tiny_prompts, plain):
    # pick as EOS a token that appears mid-way in request 0's plain output
    eos = plain.outputs[0][5]
    cut = plain.outputs[0].index(eos) + 1
    for drafter in (None, OracleDrafter(tiny_target), RandomDrafter(tiny_target.vocab_size, 4)):
        res = Engine(tiny_target, drafter, gamma=4).generate(tiny_prompts, MAX_NEW, eos_token_ids=[eos])
        assert res.outputs[0] == plain.outputs[0][:cut]
        assert res.states[0].finish_reason == "eos"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_after_rollback_equal_fresh_forward(tiny_target, tiny_prompts, temperature):
    """Every emitted token's deciding logits (from the cached, hole-riddled batch) equal those of a
    clean single-sequence forward over the accepted tokens."""
    engine = Engine(tiny_target, RandomDrafter(tiny_target.vocab_size, 5, sharpness=0.5), gamma=5,
                    temperature=temperature, record_logits=True, compact_fraction=0.05)
    res = engine.generate(tiny_prompts, [60, 45, 50], seed=3)
    assert res.summary()["drafted"] > res.summary()["accepted"] > 0 or temperature == 0
    for s in res.states:
        with torch.no_grad():
            fresh = tiny_target.model(torch.tensor([s.tokens[:-1]])).logits[0, s.n_prompt - 1:]
        got = torch.stack(s.logits)
        assert got.shape == fresh.shape
        torch.testing.assert_close(got, fresh, atol=2e-4, rtol=1e-4)
