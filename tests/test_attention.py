"""Grouped eager attention (models/attention.py): Hugging Face's eager attention without the per-head copy of
the cache gives the same outputs (within rounding), the runtime's forwards use it where the target allows, and
nothing else does."""
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

import dspark.models.attention as attention
from dspark.inference import Engine
from dspark.models.attention import groupable, grouped_attention, plain_causal


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kv,t", [(3, 1), (3, 8), (1, 5), (9, 4)])
def test_grouped_equals_eager_attention(dtype, tol, kv, t):
    torch.manual_seed(0)
    r, h, s, hd = 4, 9, 40, 16
    q = torch.randn(r, h, t, hd, dtype=dtype)
    buf = torch.randn(2, r, kv, 2 * s, hd, dtype=dtype)
    k, v = buf[0, :, :, :s], buf[1, :, :, :s]             # views with spare capacity, as the slot cache hands out
    sees = torch.rand(r, 1, t, s) > 0.3
    sees[..., -1] = True
    mask = torch.zeros(r, 1, t, s, dtype=dtype).masked_fill(~sees, torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=h // kv, training=False)
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=hd ** -0.5)
    got = grouped_attention(q, k, v, mask, hd ** -0.5).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_runtime_forwards_use_it_and_restore_eager(tiny_target, tiny_prompts, monkeypatch):
    calls = []
    real = attention.grouped_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(attention, "grouped_attention", spy)
    out = Engine(tiny_target, packed=False).generate(tiny_prompts, 6).outputs
    assert calls and tiny_target.model.config._attn_implementation == "eager"
    hf = [tiny_target.hf_generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
          for p in tiny_prompts]
    assert [o[:len(h)] for o, h in zip(out, hf)] == hf          # the same greedy tokens as Hugging Face's eager path
    calls.clear()
    tiny_target.features(torch.tensor([tiny_prompts[0]]), [1])  # training features: Hugging Face's eager attention
    assert not calls


def test_a_target_can_turn_it_off(tiny_target, tiny_prompts, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "grouped_attention", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(tiny_target, "use_grouped_attention", False)
    Engine(tiny_target, packed=False).generate(tiny_prompts[:1], 3)
    assert not calls


def test_only_llama_like_causal_attention_qualifies(tiny_target):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert groupable(tiny_target.model) and tiny_target.use_grouped_attention
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    assert not groupable(gpt2)           # its eager attention differs from Llama's (softmax in the input dtype)


def test_only_plain_causal_targets_qualify():
    assert plain_causal(SimpleNamespace())
    for other in ({"sliding_window": 4096}, {"attn_logit_softcapping": 50.0}, {"use_sinks": True},
                  {"layer_types": ["full_attention", "sliding_attention"]}):
        assert not plain_causal(SimpleNamespace(**other)), other
    assert plain_causal(SimpleNamespace(sliding_window=4096, use_sliding_window=False))   # Qwen2 with the window off
