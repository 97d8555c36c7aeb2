"""The bf16 CPU kernel (models/cpu_gemm.py): its products against an fp32 reference, its use by a target
and a drafter's head, and the choice of when it runs."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dspark.core.errors import DSparkError
from dspark.models import cpu_gemm
from dspark.models.target import load_target

needs_kernel = pytest.mark.skipif(cpu_gemm.unavailable_reason() is not None,
                                  reason=f"the kernel cannot run here: {cpu_gemm.unavailable_reason()}")


def _reference(x, w, b=None):
    """fp32 products and sums of the bf16 values, rounded once to bf16."""
    y = x.float() @ w.float().t()
    return (y if b is None else y + b.float()).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 13, cpu_gemm.MAX_ROWS + 6])
@pytest.mark.parametrize("k", [64, 37])          # a multiple of 8, and one with a scalar tail
def test_kernel_matches_an_fp32_reference_rounded_to_bf16(m, k):
    g = torch.Generator().manual_seed(m * 100 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(301, k, generator=g).bfloat16()
    got = cpu_gemm.linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 301)
    # only the summation order differs from the reference: at most one bf16 rounding step apart
    torch.testing.assert_close(got.float(), _reference(x, w).float(), rtol=2 ** -7, atol=1e-2)


@needs_kernel
def test_kernel_takes_any_leading_shape_strides_and_a_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 3, generator=g).bfloat16().transpose(1, 2)    # (2, 3, 24), not contiguous
    w, b = torch.randn(40, 24, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
    got = cpu_gemm.linear(x, w, b)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got.float(), _reference(x.reshape(-1, 24), w, b).view(2, 3, 40).float(),
                               rtol=2 ** -6, atol=2e-2)
    # autograd, other dtypes: torch's own linear
    xf = torch.randn(3, 24, requires_grad=True)
    cpu_gemm.linear(xf, w.float()).sum().backward()
    assert xf.grad is not None


@needs_kernel
@pytest.mark.parametrize("d", [64, 37])          # a multiple of 8, and one with a scalar tail
def test_the_kernels_rmsnorm_is_llamas(d):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(d)
    ref = LlamaRMSNorm(d, eps=1e-5).bfloat16()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(d, generator=g))
    x = (torch.randn(2, 5, d, generator=g) * 3).bfloat16()
    assert cpu_gemm.is_llama_rmsnorm(ref) and not cpu_gemm.is_llama_rmsnorm(nn.LayerNorm(d))
    with torch.no_grad():                          # (a weight that needs gradients takes torch's path)
        got = cpu_gemm.KernelRMSNorm(ref)(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # only the mean's summation order differs: at most one bf16 rounding step apart, mostly equal
    torch.testing.assert_close(got.float(), ref(x).float(), rtol=2 ** -6, atol=1e-2)
    assert (got == ref(x)).float().mean() > 0.9
    x32 = x.float().requires_grad_()              # autograd, other dtypes: torch's operations
    cpu_gemm.rms_norm(x32, ref.weight.float(), 1e-5).sum().backward()
    assert x32.grad is not None


def _tiny(cpu_gemm_mode: str, dtype: str = "bfloat16"):
    cfg = OmegaConf.load("conf/target/tiny.yaml")
    cfg.dtype, cfg.cpu_gemm = dtype, cpu_gemm_mode
    return load_target(cfg)


@needs_kernel
def test_a_bf16_target_runs_every_linear_through_the_kernel_with_the_same_logits():
    plain, fast = _tiny("torch"), _tiny("avx2")
    assert not plain.cpu_gemm and fast.cpu_gemm
    assert not any(type(m) is nn.Linear or cpu_gemm.is_llama_rmsnorm(m) for m in fast.model.modules())
    assert sum(isinstance(m, cpu_gemm.KernelLinear) for m in fast.model.modules()) == \
        sum(type(m) is nn.Linear for m in plain.model.modules())
    assert sum(isinstance(m, cpu_gemm.KernelRMSNorm) for m in fast.model.modules()) == \
        sum(cpu_gemm.is_llama_rmsnorm(m) for m in plain.model.modules()) > 0
    ids = torch.randint(0, plain.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    a, b = plain.model(input_ids=ids).logits.float(), fast.model(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # the LM head through the kernel too, for any vocabulary subset
    h = torch.randn(5, plain.hidden_size).bfloat16()
    vocab = torch.tensor([3, 1, 4, 15, 9])
    torch.testing.assert_close(fast.logits(h, vocab).float(), plain.logits(h, vocab).float(), rtol=2 ** -6, atol=2e-2)


@needs_kernel
def test_training_features_of_a_kernel_target_match_transformers_eager_ones():
    plain, fast = _tiny("torch"), _tiny("avx2")
    ids = torch.randint(0, plain.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    (fa, ha), (fb, hb) = plain.features(ids, [1, 3]), fast.features(ids, [1, 3])
    assert fa.shape == fb.shape and ha.shape == hb.shape
    for a, b in ((fa, fb), (ha, hb)):   # causal attention kept: equal within bf16 rounding
        assert (a.float() - b.float()).abs().max() < 0.05 * a.float().abs().max()
    assert plain.model.config._attn_implementation == fast.model.config._attn_implementation == "eager"


def _tiny_head(target, gamma: int):
    """A fresh one-layer DSpark head for the tiny target (features of its layers 1 and 3)."""
    from dspark.models.dspark import DSparkConfig, DSparkDraft

    return DSparkDraft(DSparkConfig(target="tiny", target_hidden_size=target.hidden_size,
                                    target_vocab_size=target.vocab_size, target_num_layers=target.num_layers,
                                    target_layer_ids=[1, 3], num_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=96, gamma=gamma))


@needs_kernel
def test_a_drafter_on_a_kernel_target_drafts_through_the_kernel():
    from dspark.inference.drafters import RequestState
    from dspark.inference.head_drafters import drafter_for

    target = _tiny("avx2")
    d = drafter_for(_tiny_head(target, gamma=4).attach(target), target)
    assert d.head.logits_linear is cpu_gemm.linear and d.head.markov_greedy is cpu_gemm.markov_greedy
    assert not any(type(m) is nn.Linear or cpu_gemm.is_llama_rmsnorm(m) for m in d.head.modules())
    s = RequestState(rid=0, tokens=list(range(5, 25)), n_prompt=20, max_new_tokens=8)
    d.start([s], [torch.randn(19, 2 * target.hidden_size).bfloat16()])
    (p,) = d.propose([s], [4])
    assert len(p.tokens) == 4 and all(0 <= t < target.vocab_size for t in p.tokens)
    from dspark.eval.packed_cost import proposal_times   # the kernel's greedy block timed beside the head's loop
    t = proposal_times(target, d.head, context=20, repeats=1)
    assert set(t) == {"native", "int8", "native, head's loop"} and min(t.values()) > 0


@needs_kernel
def test_greedy_markov_blocks_in_one_kernel_call_equal_the_heads_loop():
    target = _tiny("avx2")
    head = _tiny_head(target, gamma=6)
    nn.init.normal_(head.chunk_head.up_proj.weight, std=0.5)     # a bigram bias that changes the argmax
    head = head.bfloat16().attach(target)
    cpu_gemm.install_(head)
    head.logits_linear = cpu_gemm.linear
    g = torch.Generator().manual_seed(3)
    h, anchors = torch.randn(5, 6, target.hidden_size, generator=g).bfloat16(), torch.randint(0, 250, (5,), generator=g)
    loop = head.sample_block(h, anchors, 0.0)
    head.markov_greedy = cpu_gemm.markov_greedy
    fused = head.sample_block(h, anchors, 0.0)
    assert torch.equal(loop[0], fused[0]) and loop[1] is fused[1] is None   # the same sums: the same tokens
    torch.testing.assert_close(loop[2], fused[2])
    without_bias = head.base_logits(h).float().argmax(-1)
    assert not torch.equal(fused[0], without_bias)                          # the bias was applied
    assert cpu_gemm.markov_greedy(head.base_logits(h).float(), head.token_embed.weight,
                                  head.chunk_head.up_proj.weight, anchors) is None   # not bf16: the loop


def test_when_the_kernel_runs(monkeypatch):
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert not cpu_gemm.wanted("torch", cpu, bf16)
    assert not cpu_gemm.wanted("auto", cpu, torch.float32)               # fp32 targets: torch's GEMM
    with pytest.raises(DSparkError, match="bf16 targets on the CPU"):
        cpu_gemm.wanted("avx2", cpu, torch.float32)
    with pytest.raises(DSparkError, match="unknown"):
        cpu_gemm.wanted("fast", cpu, bf16)
    monkeypatch.setattr(cpu_gemm, "unavailable_reason", lambda: "it needs a CPU with AVX2 and FMA")
    assert not cpu_gemm.wanted("auto", cpu, bf16)
    with pytest.raises(DSparkError, match="AVX2 and FMA"):
        cpu_gemm.wanted("avx2", cpu, bf16)
    monkeypatch.setattr(cpu_gemm, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu_gemm, "torch_bf16_is_fast", lambda: True)   # oneDNN's bf16 GEMM: leave torch be
    assert not cpu_gemm.wanted("auto", cpu, bf16) and cpu_gemm.wanted("avx2", cpu, bf16)
    monkeypatch.setattr(cpu_gemm, "torch_bf16_is_fast", lambda: False)
    assert cpu_gemm.wanted("auto", cpu, bf16)


def test_a_compiler_that_fails_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_gemm, "_lib", None)
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    for cc in ("false", str(tmp_path / "no-such-compiler")):   # one that fails, one that is not there
        monkeypatch.setenv("CC", cc)
        with pytest.raises(DSparkError, match="target.cpu_gemm=torch"):
            cpu_gemm.install_(nn.Linear(8, 8).bfloat16())
        assert list((tmp_path / "kernels").iterdir()) == []  # nothing half-written


@needs_kernel
def test_the_side_by_side_timing_runs_every_copy_of_the_target():
    from dspark.eval.packed_cost import gemm_times

    cfg = OmegaConf.load("conf/target/tiny.yaml")
    cfg.dtype = "bfloat16"
    t = gemm_times(cfg, [1, 4], context=16, repeats=2)
    assert set(t) == {"torch", "linears", "avx2"} and all(len(v) == 2 and min(v) > 0 for v in t.values())
