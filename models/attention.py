"""Eager attention without copying the keys and values per query head.

Hugging Face's eager attention expands every layer's cached keys and values to all query heads
(`repeat_kv`) before its two matmuls: a copy of the whole cache per layer and forward. With grouped-
query attention (SmolLM2: 9 query heads over 3 key/value heads) at batch 48 × 600 cached slots that
copy was 78 % of a decode step on this CPU. `grouped_attention` computes the same scores and outputs
with the query heads of one key/value head stacked as extra query rows of one matmul instead: the
same scaling, additive mask, float32 softmax and cast as eager attention, no copy per head.

The runtime's forwards use it (`Target.cached_forward`, packed verification), and training features on a
target that runs the bf16 kernel (models/cpu_gemm.py); other training features and Hugging Face's own
`generate` keep transformers' eager attention. Only targets qualify whose eager
attention is Llama's (most decoder LMs share it) over plain full causal attention (`groupable`).
"""
from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .cpu_gemm import matmul, runs_kernel

GROUPED = "dspark_grouped"


def plain_causal(config) -> bool:
    """Whether the target's attention is full causal attention in every layer: no sliding window, no
    logit softcapping, no attention sinks (what `grouped_attention` and packed verification compute)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (all(t == "full_attention" for t in layer_types)
            and not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))
            and getattr(config, "attn_logit_softcapping", None) is None
            and not getattr(config, "use_sinks", False))


def _eager_is_llamas(model) -> bool:
    """Whether the model's attention layers call an eager function identical to Llama's (same bytecode,
    constants and names: Mistral, Qwen2/3, SmolLM3, OLMo2, Phi-3 … carry copies of it; GPT-2's differs)."""
    from transformers.models.llama import modeling_llama

    ref = modeling_llama.eager_attention_forward.__code__
    for m in model.modules():
        fn = getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None)
        if fn is not None:
            c = fn.__code__
            return (c.co_code, c.co_consts, c.co_names) == (ref.co_code, ref.co_consts, ref.co_names)
    return False


def groupable(model) -> bool:
    """Whether `grouped_attention` computes this model's eager attention: Llama's eager function over
    plain causal attention, one config (no sub-configs whose attention settings could differ)."""
    return (plain_causal(model.config) and not getattr(model.config, "sub_configs", None)
            and _eager_is_llamas(model))


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float, fp32: bool = False) -> torch.Tensor:
    """query (R, H, T, hd); key/value (R, KV, S, hd) with H a multiple of KV (query head h reads key/value
    head h // (H/KV), as `repeat_kv`); mask additive, broadcastable to (R, H, T, S) → (R, H, T, hd).
    `fp32`: the two matmuls on fp32 copies (models/cpu_gemm.matmul), for layers that run the bf16 kernel."""
    r, h, t, _ = query.shape
    kv, hd = key.shape[1], value.shape[-1]
    # the cache hands out views of a buffer with spare capacity; a plain copy first is ~5× cheaper than
    # letting the matmul copy its transposed, strided operand (with fp32, the conversion is that copy)
    key, value = (key.float(), value.float()) if fp32 else (key.contiguous(), value.contiguous())
    q = query.reshape(r, kv, (h // kv) * t, query.shape[-1])          # heads of one kv head as more rows
    w = (matmul(q, key.transpose(2, 3), fp32) * scaling).view(r, h, t, -1)
    if mask is not None:
        w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    return matmul(w.view(r, kv, (h // kv) * t, -1), value, fp32).view(r, h, t, hd)


def _grouped_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention-function interface of Hugging Face models: → (R, T, H, hd), no weights."""
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")):
        raise ValueError("grouped attention computes full causal attention only: this layer needs more "
                         "(sliding window, softcapping or sinks)")
    out = grouped_attention(query, key, value, attention_mask, scaling, fp32=runs_kernel(module))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, _grouped_eager)
AttentionMaskInterface.register(GROUPED, eager_mask)        # the same 4D additive mask eager attention gets
