"""The trained DSpark (or DFlash) head as a runtime drafter.

Per request it keeps the draft backbone's context keys/values, extended from the target's hidden
states of every verification pass (prefill, then anchor + accepted drafts each step), so a proposal
costs one backbone pass over γ block positions plus the sequential head's γ small steps.
"""
from __future__ import annotations

import torch

from dspark.models.dspark import DSparkDraft, block_positions

from .drafters import HeadDrafter, Proposal


class DSparkDrafter(HeadDrafter):
    def __init__(self, head: DSparkDraft, target, temperature: float = 0.0, seed: int = 0):
        super().__init__(head, target, temperature, seed)
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # rid → per layer (1, n, kv, hd)

    @torch.no_grad()
    def _extend(self, rid: int, feats: torch.Tensor | None) -> None:
        if feats is None:
            return
        start = self._length(rid)
        pos = torch.arange(start, start + len(feats), device=feats.device)[None]
        new = self.head.context_kv(self.head.project_context(feats[None]), pos)
        old = self.kv.get(rid)
        self.kv[rid] = new if old is None else [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1))
                                               for (k0, v0), (k1, v1) in zip(old, new)]

    def _length(self, rid: int) -> int:
        """Context positions cached for a request (the anchor's position)."""
        return self.kv[rid][0][0].shape[1] if rid in self.kv else 0

    def start(self, states, features):
        for i, s in enumerate(states):
            self.kv.pop(s.rid, None)
            feats = features[i] if features is not None else torch.zeros(0, self.head.context_proj.in_features)
            self._extend(s.rid, feats.to(self.head.context_proj.weight.device))

    def update(self, states, accepted, features):
        for i, s in enumerate(states):
            self._extend(s.rid, None if features is None else features[i])

    def finish(self, state):
        self.kv.pop(state.rid, None)

    def propose_rows(self, states, limits, rows, out):
        head, g = self.head, self.head.config.gamma
        dev = head.context_proj.weight.device
        lens = [self._length(states[i].rid) for i in rows]
        width = max(lens)
        kv = []
        for layer_idx in range(len(head.layers)):
            ks, vs = [], []
            for i, n in zip(rows, lens):
                k, v = self.kv[states[i].rid][layer_idx]
                pad = width - n
                ks.append(torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)))
                vs.append(torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)))
            kv.append((torch.cat(ks), torch.cat(vs)))
        anchors = torch.tensor([states[i].tokens[-1] for i in rows], device=dev)
        pos = block_positions(torch.tensor([len(states[i].tokens) - 1 for i in rows], device=dev), g)
        ctx_ok = torch.arange(width, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
        mask = torch.cat([ctx_ok[:, None, :].expand(-1, g, -1), torch.ones(len(rows), g, g, dtype=torch.bool,
                                                                            device=dev)], -1)
        h = head.backbone(head.block_inputs(anchors), pos, kv, mask)
        toks, probs, confs = head.sample_block(h, anchors, self.temperature, self.gen)
        toks = head.d2t[toks]
        for j, i in enumerate(rows):
            n = min(limits[i], g)
            full = None
            if probs is not None:
                full = torch.zeros(n, self.vocab_size, device=probs.device)
                full[:, head.d2t] = probs[j, :n]
            out[i] = Proposal(tokens=toks[j, :n].tolist(), probs=full, confidences=confs[j, :n].tolist())
