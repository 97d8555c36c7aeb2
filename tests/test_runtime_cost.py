"""The runtime's cost cuts keep their promises: the head drafts in the target's dtype, rejected tails are
truncated instead of left as holes, and the drafter's growing context buffers equal a from-scratch context."""
import torch

from conftest import has_compiler, tiny_head, tiny_target_cfg

from dspark.inference import Engine, drafter_for
from dspark.inference.cache import SlotCache


def test_head_drafts_in_the_target_dtype():
    from dspark.models.target import load_target

    cfg = tiny_target_cfg()
    cfg.dtype = "bfloat16"
    target = load_target(cfg)
    drafter = drafter_for(tiny_head(target), target)
    assert {p.dtype for p in drafter.head.parameters()} == {torch.bfloat16}
    assert drafter.head.lm_weight.dtype == torch.bfloat16
    res = Engine(target, drafter, gamma=4).generate([target.encode_chat("hi there")], 12)
    assert len(res.outputs[0]) == 12


def test_single_request_never_needs_compaction(tiny_target, tiny_prompts, monkeypatch):
    """At R=1 every rejected slot is dropped, so the cache has no holes to compact (a random head is
    rejected almost always, which without truncation fills the cache with holes within a few steps)."""
    compactions = []
    monkeypatch.setattr(SlotCache, "compact", lambda self: compactions.append(self.num_slots))
    engine = Engine(tiny_target, drafter_for(tiny_head(tiny_target), tiny_target), gamma=5, compact_fraction=0.0)
    res = engine.generate(tiny_prompts[1:2], 40, eos_token_ids=[])
    assert res.stats.drafted > res.stats.accepted + 20 and not compactions
    plain = Engine(tiny_target).generate(tiny_prompts[1:2], 40, eos_token_ids=[])
    assert res.outputs == plain.outputs


def test_incremental_context_equals_a_fresh_start(tiny_target, tiny_prompts):
    """After a run of two requests, the drafter's buffered context (queued step by step, caught up for
    both rows in shared passes, grown by doubling) proposes what a drafter started from each whole
    sequence's features at once proposes."""
    head = tiny_head(tiny_target)
    drafter = drafter_for(head, tiny_target)
    kept = {}
    drafter.finish = lambda state: kept.setdefault(state.rid, state)   # keep the buffers after the run
    Engine(tiny_target, drafter, gamma=5).generate([tiny_prompts[2], tiny_prompts[0]], [70, 50],
                                                   eos_token_ids=[])   # > 64 positions: the buffers grow
    states = [kept[0], kept[1]]
    assert len(states[0].tokens) != len(states[1].tokens)
    for state in states:
        assert drafter._length(state.rid) == len(state.tokens) - 1
    both = drafter.propose(states, [5, 5])
    for state, a in zip(states, both):
        ids = torch.tensor([state.tokens[:-1]])
        feats, _ = tiny_target.features(ids, list(head.config.target_layer_ids))
        fresh = drafter_for(head, tiny_target)
        fresh.start([state], [feats[0]])
        b = fresh.propose([state], [5])[0]
        assert a.tokens == b.tokens
        assert torch.allclose(torch.tensor(a.confidences), torch.tensor(b.confidences), atol=1e-4)


def test_steps_without_drafting_cost_the_drafter_nothing(tiny_target, tiny_prompts):
    """The head's context is caught up only when it proposes: a policy that drafts every fourth step
    runs the context projection once per proposal (not once per step), and the output stays plain greedy."""
    from dspark.inference.policy import VerifyAll

    class EveryFourth(VerifyAll):
        steps = 0

        def draft_rows(self, states):
            self.steps += 1
            return [self.steps % 4 == 1] * len(states)

    head = tiny_head(tiny_target)
    drafter = drafter_for(head, tiny_target)
    calls = []
    real = head.context_kv
    head.context_kv = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    policy = EveryFourth()
    res = Engine(tiny_target, drafter, policy=policy, gamma=4).generate(tiny_prompts[:2], 30, eos_token_ids=[])
    assert res.outputs == Engine(tiny_target).generate(tiny_prompts[:2], 30, eos_token_ids=[]).outputs
    proposing = (policy.steps + 3) // 4
    assert 0 < len(calls) <= 2 * proposing < policy.steps


def test_int8_linear_matches_its_float_layer_within_rounding():
    from dspark.inference.int8_weights import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear(lin, torch.float32)
    x = torch.randn(3, 5, 96)
    step = lin.weight.abs().amax(1) / 127                       # one rounding step per output row
    bound = 0.5 * x.abs().sum(-1, keepdim=True) * step + 1e-5   # |Σ x·δw| with |δw| ≤ step / 2
    assert q(x).shape == (3, 5, 40) and ((q(x) - lin(x)).abs() <= bound).all()
    assert not torch.equal(q(x), lin(x))                         # it does round: the test sees the int8 path


def first_step_agreement(target, prompts, reference, variant) -> tuple[int, int]:
    """Greedy output with either drafter equals plain greedy at R = 1 and R = 3; returns how many of the first
    step's drafts (same context for both) agree, and how many there were."""
    same = total = 0
    for batch in ([prompts[1]], prompts):
        plain = Engine(target).generate(batch, 30, eos_token_ids=[]).outputs
        runs = []
        for d in (reference, variant):
            recorded = []
            propose = d.propose
            d.propose = lambda states, limits, p=propose, r=recorded: r.append(p(states, limits)) or r[-1]
            runs.append((Engine(target, d, gamma=4).generate(batch, 30, eos_token_ids=[]).outputs, recorded))
            del d.propose
        assert runs[1][0] == runs[0][0] == plain
        for a, b in zip(runs[0][1][0], runs[1][1][0]):
            same += sum(x == y for x, y in zip(a.tokens, b.tokens))
            total += len(a.tokens)
    return same, total


def test_int8_drafting_halves_the_matrices_keeps_the_callers_head_and_stays_lossless(tiny_target, tiny_prompts):
    """int8 weights (inference/int8_weights.py) swap every Linear narrower than the draft vocabulary; the
    drafts mostly agree with the native head's, and greedy output stays exactly plain greedy at R = 1
    (no attention mask) and R = 3 (masked ragged context)."""
    from dspark.inference.int8_weights import Int8Linear, quantize_head_

    head = tiny_head(tiny_target, draft_vocab=200)
    native, int8 = drafter_for(head, tiny_target), drafter_for(head, tiny_target, draft_weights="int8")
    assert not any(isinstance(m, Int8Linear) for m in head.modules())   # the caller's head is untouched
    swapped = [m for m in int8.head.modules() if isinstance(m, Int8Linear)]
    assert len(swapped) >= 8 and all(m.out_features < 200 for m in swapped)
    assert int8.head.chunk_head.up_proj.weight.dtype == torch.float32   # vocabulary-wide: kept native
    import copy
    before, after = quantize_head_(copy.deepcopy(head))
    assert after < 0.3 * before                                          # fp32 → int8 + one scale per row
    same, total = first_step_agreement(tiny_target, tiny_prompts, native, int8)
    assert total and same >= 0.75 * total, (same, total)


def test_int8_drafting_without_the_kernel_is_one_clear_error(tiny_target, monkeypatch):
    import pytest

    from dspark.core.errors import DSparkError

    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    with pytest.raises(DSparkError, match="draft_weights=native"):
        drafter_for(tiny_head(tiny_target), tiny_target, draft_weights="int8")


def test_compiled_drafting_drafts_like_the_eager_head_and_stays_lossless(tiny_target, tiny_prompts):
    """draft_compile (inference/compiled_head.py) runs the head's hot methods through torch.compile on a
    copy of its own: drafts equal the eager head's up to rounding, greedy output stays exactly plain greedy
    at R = 1 (no attention mask) and R = 3 (masked ragged context), and the caller's head is untouched."""
    import pytest

    if not has_compiler():
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    head = tiny_head(tiny_target, draft_vocab=200)
    eager, compiled = drafter_for(head, tiny_target), drafter_for(head, tiny_target, draft_compile=True)
    assert "backbone" not in vars(head) and "backbone" in vars(compiled.head)   # only the copy is compiled
    same, total = first_step_agreement(tiny_target, tiny_prompts, eager, compiled)
    assert total and same >= 0.9 * total, (same, total)


def test_compiled_drafting_without_a_compiler_is_one_clear_error(tiny_target, monkeypatch):
    import shutil

    import pytest

    from dspark.core.errors import DSparkError

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DSparkError, match="draft_compile=false"):
        drafter_for(tiny_head(tiny_target), tiny_target, draft_compile=True)
