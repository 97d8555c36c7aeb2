"""Eager attention without copying the keys and values per query head.

Hugging Face's eager attention expands every layer's cached keys and values to all query heads
(`repeat_kv`) before its two matmuls: a copy of the whole cache per layer and forward. With grouped-
query attention (SmolLM2: 9 query heads over 3 key/value heads) at batch 48 × 600 cached slots that
copy was 78 % of a decode step on this CPU. `grouped_attention` computes the same thing, scores by
scores, with the query heads of one key/value head stacked as extra query rows instead: the
same matmul, scaling, additive mask, float32 softmax and cast as eager attention, no copy of the cache.

The runtime's forwards use it (`Target.cached_forward`); training features and Hugging Face's own
`generate` keep Hugging Face's eager attention. Only targets whose attention is plain full causal
attention qualify (`plain_causal`): a sliding window, logit softcapping or attention sinks keep eager.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

GROUPED = "dspark_grouped"


def plain_causal(config) -> bool:
    """Whether the target's attention is full causal attention in every layer: no sliding window, no
    logit softcapping, no attention sinks (what `grouped_attention` and packed verification compute)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (all(t == "full_attention" for t in layer_types)
            and not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))
            and getattr(config, "attn_logit_softcapping", None) is None
            and not getattr(config, "use_sinks", False))


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
    """query (R, H, T, hd); key/value (R, KV, S, hd) with H a multiple of KV (query head h reads key/value
    head h // (H/KV), as `repeat_kv`); mask additive, broadcastable to (R, H, T, S) → (R, H, T, hd)."""
    r, h, t, hd = query.shape
    kv = key.shape[1]
    # the cache hands out views of a buffer with spare capacity; a plain copy first is ~5× cheaper than
    # letting the matmul copy its transposed, strided operand
    key, value = key.contiguous(), value.contiguous()
    q = query.reshape(r, kv, (h // kv) * t, hd)                       # heads of one kv head as more rows
    w = (torch.matmul(q, key.transpose(2, 3)) * scaling).view(r, h, t, -1)
    if mask is not None:
        w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(w.view(r, kv, (h // kv) * t, -1), value).view(r, h, t, hd)


def _grouped_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention-function interface of Hugging Face models: → (R, T, H, hd), no weights."""
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")):
        raise ValueError("grouped attention computes full causal attention only: this layer needs more "
                         "(sliding window, softcapping or sinks)")
    return grouped_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, _grouped_eager)
AttentionMaskInterface.register(GROUPED, eager_mask)        # the same 4D additive mask eager attention gets
