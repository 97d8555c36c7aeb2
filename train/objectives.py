"""Training objectives plugged into the one Trainer: `forward_loss(batch, gen) -> (loss_sum, count, stats)`.

`dspark` and `dflash` share one objective (DFlash is the head without its sequential part); a
future `eagle3` adds its own class here with the same signature.
"""
from __future__ import annotations

import torch

from dspark.models.losses import block_losses

from .data import sample_anchors


class BlockObjective:
    """Packed anchor blocks over target features; losses of DESIGN §1 (models/losses.py)."""

    def __init__(self, model, target, features, anchors_per_seq: int, alpha: dict):
        self.model, self.target, self.features = model, target, features
        self.anchors_per_seq, self.alpha = anchors_per_seq, dict(alpha)
        self.lm_weight = target.model.get_output_embeddings().weight.detach()

    def forward_loss(self, batch: dict, gen: torch.Generator | None, head) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`self.model` may be wrapped for data parallelism; `head` is the unwrapped module (buffers)."""
        g = head.config.gamma
        feats, last = self.features(batch)
        dev = head.mask_embedding.device
        ids = batch["input_ids"].to(dev)
        anchors, valid = sample_anchors(batch["loss_mask"], self.anchors_per_seq, g, gen)
        anchors, valid = anchors.to(dev), valid.to(dev)
        b, a = anchors.shape
        width = ids.shape[1]
        pos = anchors[:, :, None] + torch.arange(g + 1, device=dev)          # (B, A, γ+1): anchor … n+γ
        toks = ids.gather(1, pos.clamp_max(width - 1).view(b, -1)).view(b, a, g + 1)
        draft_logits, conf_logits = self.model(feats.to(dev), ids, anchors, batch["valid"].to(dev), toks[..., :-1])
        with torch.no_grad():
            # the target's distribution for token n+k comes from its final state at n+k−1
            h_t = last.gather(1, pos[..., :-1].clamp_max(width - 1).view(b, -1, 1).expand(-1, -1, last.shape[-1]))
            target_logits = (h_t.to(self.lm_weight.device, self.lm_weight.dtype) @ self.lm_weight.t()).view(b, a, g, -1).to(dev)
        labels = head.t2d[toks[..., 1:]]
        out = block_losses(draft_logits.view(b * a, g, -1), conf_logits.view(b * a, g),
                           target_logits.view(b * a, g, -1), labels.view(b * a, g), valid.view(b * a, g),
                           head.d2t, self.alpha)
        return out["loss"], out["count"], out


OBJECTIVES = {"dspark": BlockObjective, "dflash": BlockObjective}
