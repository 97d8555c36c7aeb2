"""Training objectives plugged into the one Trainer: `forward_loss(batch, gen) -> (loss_sum, count, stats)`.

Keyed by head architecture: `dspark` heads (DFlash is the DSpark head without its sequential part)
share one objective; `eagle3` trains the autoregressive EAGLE-3 head with training-time test on the
same anchors and target distributions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import sample_anchors
from .losses import TargetDist, block_losses, position_weights, walk_tau


class BlockObjective:
    """Packed anchor blocks over target features; losses of docs/design.md §1 (train/losses.py)."""

    STATS_CHUNK = 256   # positions per pass of the full-vocabulary LM head (bounds its memory)

    def __init__(self, model, target, features, anchors_per_seq: int, alpha: dict, keep_stats: bool = True):
        self.model, self.target, self.features = model, target, features
        self.anchors_per_seq, self.alpha = anchors_per_seq, dict(alpha)
        self.keep_stats = keep_stats
        self.row_stats: dict = {}   # prompt id → (lse (L,), argmax (L,)) of the target's full distributions, on the CPU

    def forward_loss(self, batch: dict, gen: torch.Generator | None, head) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`self.model` may be wrapped for data parallelism; `head` is the unwrapped module (buffers)."""
        g = head.config.gamma
        feats, ids, anchors, valid, toks, target = self.blocks(batch, gen, head)
        b, a = anchors.shape
        draft_logits, conf_logits = self.model(feats, ids, anchors, batch["valid"].to(ids.device), toks[..., :-1])
        # CE labels: the dataset's next tokens, or (`loss.labels=target`, for answers the target did not
        # write) the target's argmax after the same prefix; the chunk head is teacher-forced with the
        # dataset's tokens either way, the prefix the target's distributions are conditioned on
        labels = target.top if self.alpha.get("labels") == "target" else head.t2d[toks[..., 1:]]
        out = block_losses(draft_logits.view(b * a, g, -1), conf_logits.view(b * a, g), target.view(b * a, g),
                           labels.view(b * a, g), valid.view(b * a, g), self.alpha)
        return out["loss"], out["count"], out

    first_anchor = 0   # the first position a block may be anchored at (Eagle-3 drafts nothing for x_1)

    @torch.no_grad()
    def walk(self, row: dict, head, chunk: int) -> tuple[int, int]:
        """(tokens, steps) of the greedy runtime's walk over one collated row's response (losses.walk_tau),
        the dataset's tokens taken as the target's greedy choices (true for greedy regeneration): every
        response position is an anchor, run `chunk` anchors per pass (a block sees only the context before
        its anchor and its own positions, so chunking changes nothing); the draft's argmax must equal the
        next tokens in order."""
        g, dev = head.config.gamma, head.d2t.device
        feats, _ = self.features(row)
        feats, ids, ctx = feats.to(dev), row["input_ids"].to(dev), row["valid"].to(dev)
        anchors, valid = sample_anchors(row["loss_mask"], 0, g, None)
        valid &= (anchors >= self.first_anchor)[..., None]
        leading = []
        for i in range(0, anchors.shape[1], chunk):
            a = anchors[:, i:i + chunk].to(dev)
            pos = (a[..., None] + torch.arange(g + 1, device=dev)).clamp_max(ids.shape[1] - 1)
            toks = ids.gather(1, pos.view(1, -1)).view(1, -1, g + 1)
            out = self.model(feats, ids, a, ctx, toks[..., :-1])
            logits = (out[0] if isinstance(out, tuple) else out).view(1, a.shape[1], g, -1)
            labels = head.t2d[toks[..., 1:]]
            match = (logits.argmax(-1) == labels) & (labels < logits.shape[-1]) & valid[:, i:i + chunk].to(dev)
            leading.append(torch.cumprod(match.int(), -1).sum(-1))
        return walk_tau(torch.cat(leading, 1)[0].cpu(), anchors[0], valid[0, :, 0])

    def blocks(self, batch: dict, gen: torch.Generator | None, head):
        """Anchors and what every block is scored against: features (B, L, k·H), ids (B, L), anchors (B, A),
        valid (B, A, γ), tokens x_n … x_{n+γ} (B, A, γ+1), the target's distributions of x_{n+1} … x_{n+γ}
        (a TargetDist of shape (B, A, γ))."""
        g, dev = head.config.gamma, head.d2t.device
        feats, last = self.features(batch)
        ids = batch["input_ids"].to(dev)
        anchors, valid = sample_anchors(batch["loss_mask"], self.anchors_per_seq, g, gen)
        anchors, valid = anchors.to(dev), valid.to(dev)
        b, a = anchors.shape
        width = ids.shape[1]
        pos = anchors[:, :, None] + torch.arange(g + 1, device=dev)          # (B, A, γ+1): anchor … n+γ
        toks = ids.gather(1, pos.clamp_max(width - 1).view(b, -1)).view(b, a, g + 1)
        with torch.no_grad():
            # the target's distribution for token n+k comes from its final state at n+k−1
            at = pos[..., :-1].clamp_max(width - 1).view(b, -1)
            h_t = last.gather(1, at[..., None].expand(-1, -1, last.shape[-1]))
            if self.keep_stats:
                lse, top = self.stats(batch, last, at.cpu())
                target = TargetDist(self.target.logits(h_t, head.d2t).view(b, a, g, -1).to(dev),
                                    lse.view(b, a, g).to(dev), head.t2d[top.view(b, a, g).to(dev)])
            else:
                target = TargetDist.from_full(self.target.logits(h_t).view(b, a, g, -1).to(dev), head.d2t, head.t2d)
        return feats.to(dev), ids, anchors, valid, toks, target

    def stats(self, batch: dict, last: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-partition and argmax (target id) of the target's whole-vocabulary distribution at
        positions `at` (B, N) of the batch's rows. They are the same every epoch, so each row's are computed
        once, the first time a batch holds it, at every position whose next token is a response token (the
        only ones a loss reads; the others get lse = +inf), and kept in RAM (8 bytes per token): a step then
        runs the LM head over the draft vocabulary only. A row's pass has the same shape whenever it runs,
        so resumed runs see the same values. `at` and the results are on the CPU."""
        lses, tops = [], []
        for i, pid in enumerate(batch["prompt_id"]):
            if pid not in self.row_stats:
                n = int(batch["valid"][i].sum())
                need = (batch["loss_mask"][i, 1:n] > 0).nonzero()[:, 0]
                lse = torch.full((n,), math.inf)
                top = torch.zeros(n, dtype=torch.int32)
                for c in need.split(self.STATS_CHUNK):
                    logits = self.target.logits(last[i, c.to(last.device)]).float()
                    lse[c], top[c] = torch.logsumexp(logits, -1).cpu(), logits.argmax(-1).int().cpu()
                self.row_stats[pid] = lse, top
            lse, top = self.row_stats[pid]
            j = at[i].clamp_max(len(lse) - 1)        # positions past the row are padding: never read by a loss
            lses.append(lse[j])
            tops.append(top[j])
        return torch.stack(lses), torch.stack(tops).long()


class Eagle3Objective(BlockObjective):
    """EAGLE-3 training-time test on the same packed anchors: from each anchor the drafter runs γ steps,
    feeding its own output back as the next step's feature (models/eagle3.py), and step k is trained
    towards the target's distribution of x_{n+k}: forward KL to the target softmax restricted to the
    draft vocabulary and renormalised (EAGLE-3's loss), weighted by w_k (`loss.decay`, train/losses.py). Validation
    stats (expected τ, greedy τ, L1, CE) are those of `block_losses`; the confidence reported is the
    draft's top probability, so `bce` measures how well that works as a survival estimate. There is no
    draft entry for x_0 (speculators / vLLM convention, models/eagle3.py), so a block anchored at
    position 0 (x_1 is never drafted) is not scored."""

    first_anchor = 1

    def forward_loss(self, batch: dict, gen: torch.Generator | None, head) -> tuple[torch.Tensor, torch.Tensor, dict]:
        g = head.config.gamma
        feats, ids, anchors, valid, toks, target = self.blocks(batch, gen, head)
        b, a = anchors.shape
        draft_logits = self.model(feats, ids, anchors, batch["valid"].to(ids.device), toks[..., :-1]).view(b * a, g, -1)
        target = target.view(b * a, g)
        valid = (valid & (anchors >= self.first_anchor)[..., None]).view(b * a, g)
        logp_d = F.log_softmax(draft_logits.float(), -1)
        top = logp_d.detach().max(-1).values.exp().clamp(1e-6, 1 - 1e-6)
        out = block_losses(draft_logits, torch.logit(top), target, head.t2d[toks[..., 1:]].view(b * a, g),
                           valid, {"ce": 0.0, "l1": 0.0, "conf": 0.0})
        with torch.no_grad():
            p_t = F.softmax(target.logits.float(), -1)         # restricted to the draft vocabulary, renormalised
        kl = (p_t * (p_t.clamp_min(1e-12).log() - logp_d)).sum(-1)             # (N, γ)
        out["loss"] = (kl * position_weights(g, kl.device, self.alpha.get("decay")) * valid).sum()
        return out["loss"], out["count"], out


# Training objective by head architecture (the key of models/heads.py HEADS; DFlash is a DSpark head).
OBJECTIVES = {"dspark": BlockObjective, "eagle3": Eagle3Objective}
