"""Sequential Temperature Scaling (STS) and the calibration metrics it is judged by.

Input: per drafted block, the raw confidences c_1..c_ℓ of the positions the target verified and the
number of them that survived. The quantity the scheduler uses is the cumulative product
a_k = Π_{i≤k} c_i (probability that the first k drafts all survive), so STS calibrates *that*:
for k = 1..γ in order, one temperature T_k rescales position k's confidence logit
(c_k ← σ(logit(c_k) / T_k)) and is chosen on a 1-D grid to minimise the ECE of a_k against the
observed prefix survival, with T_1..T_{k−1} already fixed. ECE alone also rewards collapsing all
confidences onto their mean, so among temperatures within sampling noise of the lowest ECE the one
with the lowest Brier score wins. Temperatures keep the order of each position's confidences.
"""
from __future__ import annotations

import math

import torch

GRID = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 241))   # includes T = 1


def ece(prob: torch.Tensor, label: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with equal-width bins (weighted mean |confidence − frequency|)."""
    if prob.numel() == 0:
        return float("nan")
    idx = (prob * bins).long().clamp(0, bins - 1)
    prob, label = prob.double(), label.double()
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, prob)
    freq = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, label)
    return float((conf - freq).abs().sum() / prob.numel())


def brier(prob: torch.Tensor, label: torch.Tensor) -> float:
    return float(((prob - label) ** 2).mean()) if prob.numel() else float("nan")


def auroc(score: torch.Tensor, label: torch.Tensor) -> float | None:
    """Probability that a random positive outranks a random negative (ties count half); None if one class."""
    pos, neg = int(label.sum()), int((1 - label).sum())
    if pos == 0 or neg == 0:
        return None
    _, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    ranks = (first + (counts - 1) / 2.0).to(torch.float64)[inverse]      # mean rank over ties
    return float((ranks[label.bool()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def blocks_to_tensors(blocks: list[tuple[list[float], int, int]], gamma: int):
    """(confidences, verified ℓ, accepted n) per block → logits (N, γ), verified mask (N, γ),
    prefix survival labels (N, γ): label_k = 1 iff the first k drafts survived."""
    n = len(blocks)
    z = torch.zeros(n, gamma, dtype=torch.float64)
    verified = torch.zeros(n, gamma, dtype=torch.bool)
    label = torch.zeros(n, gamma, dtype=torch.float64)
    for i, (conf, ell, acc) in enumerate(blocks):
        ell = min(ell, gamma, len(conf))
        if ell == 0:
            continue
        c = torch.tensor(conf[:ell], dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
        z[i, :ell] = torch.log(c) - torch.log1p(-c)
        verified[i, :ell] = True
        label[i, :min(acc, ell)] = 1.0
    return z, verified, label


def cumulative(z: torch.Tensor, temps: list[float]) -> torch.Tensor:
    """a (N, γ) from logits and per-position temperatures (missing ones = 1)."""
    t = torch.tensor([temps[k] if k < len(temps) else 1.0 for k in range(z.shape[1])], dtype=z.dtype)
    return torch.cumprod(torch.sigmoid(z / t), dim=1)


def fit_sts(z: torch.Tensor, verified: torch.Tensor, label: torch.Tensor, bins: int = 15,
            min_blocks: int = 20) -> list[float]:
    """Per-position temperatures, in order; a position with fewer than `min_blocks` verified blocks
    keeps the previous position's temperature (1.0 for the first)."""
    temps: list[float] = []
    prefix = torch.ones(z.shape[0], dtype=z.dtype)
    for k in range(z.shape[1]):
        rows = verified[:, k]
        if int(rows.sum()) < min_blocks:
            temps.append(temps[-1] if temps else 1.0)
        else:
            # ECE is minimised by collapsing every confidence onto the mean (T → ∞) as well; so among
            # temperatures whose ECE is within sampling noise of the minimum, take the lowest Brier score
            y, prev = label[rows, k], prefix[rows]
            cands = [(ece(prev * torch.sigmoid(z[rows, k] / t), y, bins), t) for t in GRID.tolist()]
            floor = min(e for e, _ in cands) + max(0.002, 0.5 / math.sqrt(len(y)))
            best_t = min((t for e, t in cands if e <= floor),
                         key=lambda t: brier(prev * torch.sigmoid(z[rows, k] / t), y))
            temps.append(best_t)
        prefix = prefix * torch.sigmoid(z[:, k] / temps[-1])
    return temps


def position_report(z, verified, label, temps: list[float], bins: int = 15) -> list[dict]:
    """Per position: blocks, observed survival, ECE / Brier before and after, AUROC (order-preserving,
    so the same before and after up to ties)."""
    before, after = cumulative(z, []), cumulative(z, temps)
    out = []
    for k in range(z.shape[1]):
        rows = verified[:, k]
        y = label[rows, k]
        out.append({"position": k + 1, "blocks": int(rows.sum()), "survival": float(y.mean()) if len(y) else None,
                    "temperature": temps[k] if k < len(temps) else 1.0,
                    "ece_before": ece(before[rows, k], y, bins), "ece_after": ece(after[rows, k], y, bins),
                    "brier_before": brier(before[rows, k], y), "brier_after": brier(after[rows, k], y),
                    "auroc": auroc(after[rows, k], y)})
    return out
