"""DSpark training losses (docs/design.md §1), per drafted position k = 1..γ of every block:

    α_ce·CE(label) + α_l1·‖p_d − p_t‖₁ + α_conf·BCE(c_k, c*_k),   c*_k = 1 − ½‖p_d − p_t‖₁,

each weighted by w_k = exp(−(k−1)/d), d = `loss.decay` (default γ; the paper uses 4). The L1 distance is twice the total variation distance, so
c*_k is the probability that a draft sampled from p_d is accepted against p_t. With a reduced draft
vocabulary the target's mass outside it counts fully in the L1 term (the draft can never propose those
tokens) and CE skips labels outside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def position_weights(gamma: int, device=None, decay: float | None = None) -> torch.Tensor:
    """w_k = exp(−(k−1)/decay) for k = 1..γ; decay None means γ."""
    return torch.exp(-torch.arange(gamma, device=device, dtype=torch.float32) / (decay or gamma))


@dataclass
class TargetDist:
    """The target's distribution at drafted positions, as the losses read it: its logits over the draft
    vocabulary (…, Vd), the log-partition of its whole vocabulary (…,) and its argmax as a draft id (…,),
    Vd when that token lies outside the draft vocabulary. Positions no loss reads may carry lse = +inf
    (probability 0 everywhere)."""
    logits: torch.Tensor
    lse: torch.Tensor
    top: torch.Tensor

    @classmethod
    def from_full(cls, logits: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor) -> "TargetDist":
        """From logits over the target's whole vocabulary (…, V)."""
        f = logits.float()
        return cls(logits[..., d2t], torch.logsumexp(f, -1), t2d[f.argmax(-1)])

    def probs(self) -> torch.Tensor:
        """(…, Vd) the target's probabilities of the draft vocabulary's tokens (summing to ≤ 1)."""
        return torch.exp(self.logits.float() - self.lse[..., None])

    def view(self, *shape) -> "TargetDist":
        return TargetDist(self.logits.view(*shape, -1), self.lse.view(*shape), self.top.view(*shape))


def block_losses(draft_logits, conf_logits, target: TargetDist, labels_draft, valid, alpha: dict) -> dict:
    """draft_logits (N, γ, Vd); conf_logits (N, γ); target (N, γ) positions; labels_draft (N, γ) draft ids
    (Vd = outside the draft vocabulary); valid (N, γ) bool.
    Returns sums over valid positions (normalise outside, across ranks) and per-position stats."""
    vd = draft_logits.shape[-1]
    logp_d = F.log_softmax(draft_logits.float(), -1)
    p_d = logp_d.exp()
    p_t = target.probs()
    l1 = (p_d - p_t).abs().sum(-1) + (1 - p_t.sum(-1)).clamp_min(0)           # (N, γ)
    accept = (1 - 0.5 * l1).clamp(0, 1).detach()                                # c*
    in_vocab = labels_draft < vd
    ce = -logp_d.gather(-1, labels_draft.clamp_max(vd - 1)[..., None])[..., 0] * in_vocab
    bce = F.binary_cross_entropy_with_logits(conf_logits.float(), accept, reduction="none")
    w = position_weights(draft_logits.shape[1], draft_logits.device, alpha.get("decay")) * valid
    loss = (alpha["ce"] * ce + alpha["l1"] * l1 + alpha["conf"] * bce) * w
    greedy = draft_logits.argmax(-1) == target.top            # never when the target's argmax is outside
    return {"loss": loss.sum(), "ce": (ce * valid).sum(), "l1": (l1 * valid).sum(), "bce": (bce * valid).sum(),
            "count": valid.sum(), "accept": accept, "greedy": greedy & valid, "valid": valid,
            "conf": torch.sigmoid(conf_logits.float()).detach()}


def expected_tau(accept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 + Σ_j Π_{i≤j} a_i per block, truncated at the first invalid position. (N, γ) → (N,)."""
    return 1 + torch.cumprod(accept.float() * valid, -1).sum(-1)


def walk_tau(leading: torch.Tensor, anchors: torch.Tensor, ok: torch.Tensor) -> tuple[int, int]:
    """The greedy runtime's walk over one response, verifying every drafted token: the first step is
    anchored at the prompt's last token (the runtime's prefill stops before it), a step from anchor n
    accepts `leading[n]` drafted tokens plus the target's own, and the next step is anchored after them.
    leading (A,) greedy leading-match length at the anchor positions anchors (A,) (every position whose
    next token is a response token), ok (A,) the anchors that exist; a response with gaps (several
    turns) is walked up to its first gap. Returns (tokens, steps):
    τ = tokens / steps is what verify-all measures on this text (the runtime's τ), unlike the mean over
    uniform anchors (expected_tau), which over-weights easy stretches that a walk crosses in few steps."""
    at = {int(n): int(l) for n, l, o in zip(anchors, leading, ok) if o}
    if not at:
        return 0, 0
    n = end = min(at)
    while end in at:                       # the response's first run of anchors; its last token is at `end`
        end += 1
    tokens = steps = 0
    while n in at:
        made = min(at[n] + 1, end - n)
        tokens, steps, n = tokens + made, steps + 1, n + made
    return tokens, steps


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    t = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
