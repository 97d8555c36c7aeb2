"""Weight-only int8 drafting (`draft_weights=int8`).

At R = 1 a proposal multiplies a handful of rows by each of the head's matrices once, and right after
a target step none of them is in cache, so it costs the bytes of its weights over memory bandwidth
(docs/design.md). Kept as int8 with one scale per output row, a matrix reads half of bf16's bytes,
and torch's `_weight_int8pack_mm` multiplies by it without expanding it. That pays for the backbone's
and the context projection's matrices; for vocabulary-sized outputs (the draft LM head, the Markov
head's up-projection) the int8 kernel was slower than bf16 on this CPU, so they stay as they are.
Rounding moves each weight by at most half a step (1/254 of its row's largest): a near-tie in the draft
may flip, the output never does, since verification is exact.
"""
from __future__ import annotations

import torch
from torch import nn

from dspark.core.errors import DSparkError
from dspark.models.cpu_gemm import swap_linears_


class Int8Linear(nn.Module):
    """y = x·Wᵀ (+ b) with W stored as int8 rows × one scale per row, in the input's dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_head_(head: nn.Module) -> tuple[int, int]:
    """Swap, in place, every Linear of a head whose output is narrower than the draft vocabulary for an
    int8 one (in the head's dtype). Returns the swapped matrices' bytes before and after."""
    if not hasattr(torch, "_weight_int8pack_mm"):   # a private op (torch 2.3+): say so instead of failing mid-run
        raise DSparkError(f"draft_weights=int8 needs torch._weight_int8pack_mm, which torch {torch.__version__} "
                         "lacks: use draft_weights=native or the pinned torch")
    vocab, dtype = head.config.draft_vocab_size, next(head.parameters()).dtype
    pairs = swap_linears_(head, lambda m: Int8Linear(m, dtype), lambda m: m.out_features < vocab)
    return (sum(m.weight.numel() * m.weight.element_size() for m, _ in pairs),
            sum(q.q.numel() + q.scale.numel() * q.scale.element_size() for _, q in pairs))
