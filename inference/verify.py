"""Lossless verification of drafted tokens against the target's logits.

Greedy: accept drafts while they equal the target's argmax; the target adds its own next token.
Sampling: rejection sampling (accept x with probability min(1, p(x)/q(x)); on the first rejection
sample from normalize(max(0, p − q)); when every draft survives, sample the bonus token from p).
The result is distributed exactly as the target's own sampling (temperature, top-k and top-p applied to p).
"""
from __future__ import annotations

import torch


def target_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Sampling distribution of the target: softmax(logits / T) over the top-k tokens (0 = all; ties with
    the k-th logit stay), restricted to the top-p nucleus."""
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor):
    """Batched greedy verification.

    logits (R, T, V), drafts (R, T-1) (padding beyond each row's length ignored), lengths (R,).
    Returns (n_accepted (R,), target_argmax (R, T)).
    """
    best = logits.float().argmax(dim=-1)   # (R, T); exact upcast, and ~4x faster than bf16 argmax on CPU
    t = logits.shape[1]
    if t == 1:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device), best
    in_range = torch.arange(t - 1, device=logits.device)[None, :] < lengths[:, None]
    match = (drafts == best[:, :-1]) & in_range                            # (R, T-1)
    n_acc = match.long().cumprod(dim=1).sum(dim=1)                         # (R,)
    return n_acc, best


def verify_sampled(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[int, int]:
    """Rejection sampling for one row.

    p (ℓ+1, V): target distributions at the anchor and each draft position; drafts: ℓ tokens;
    q (ℓ, V) draft distributions, or None for a deterministic drafter (q = point mass on the draft).
    Returns (number accepted, the extra token: residual resample on rejection, else bonus).
    """
    n = len(drafts)
    if n:
        idx = torch.arange(n, device=p.device)
        x = torch.tensor(drafts, device=p.device)
        px = p[idx, x]
        qx = q[idx, x] if q is not None else torch.ones_like(px)
        ratio = torch.where(qx > 0, px / qx.clamp_min(1e-30), torch.zeros_like(px))
        u = torch.rand(n, generator=generator, device=generator.device).to(p.device)
        ok = u < ratio.clamp(max=1.0)
        rejected = (~ok).nonzero()
        if rejected.numel():
            k = int(rejected[0, 0])
            if q is not None:
                residual = (p[k] - q[k]).clamp_min(0.0)
            else:
                residual = p[k].clone()
                residual[drafts[k]] = 0.0
            if float(residual.sum()) <= 0.0:   # p == q on the support: any target sample is exact
                residual = p[k]
            return k, _sample(residual, generator)
    return n, _sample(p[n], generator)


def _sample(weights: torch.Tensor, generator: torch.Generator) -> int:
    w = weights.float().to(generator.device)
    return int(torch.multinomial(w / w.sum(), 1, generator=generator))
