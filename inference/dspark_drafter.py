"""The trained DSpark (or DFlash) head as a runtime drafter.

Per request it keeps the draft backbone's context keys/values, extended from the target's hidden
states of every verification pass (prefill, then anchor + accepted drafts each step), so a proposal
costs one backbone pass over γ block positions plus the sequential head's γ small steps.

The context is extended lazily: `start` and `update` only queue the target's features, and a proposal
first runs the context projection over everything queued for its requests, in one pass.
A step the policy does not draft (the scheduler backing off under load) then costs the drafter nothing,
and the steps it skipped are caught up in one pass instead of one per step.
"""
from __future__ import annotations

import torch

from dspark.models.dspark import DSparkDraft, block_positions

from .drafters import HeadDrafter, Proposal


class DSparkDrafter(HeadDrafter):
    def __init__(self, head: DSparkDraft, target, temperature: float = 0.0, seed: int = 0, draft_weights: str = "native",
                 draft_compile: bool = False):
        super().__init__(head, target, temperature, seed, draft_weights, draft_compile)
        # rid → per layer [keys, values] buffers (1, capacity, kv, hd), filled up to self.length[rid]:
        # they grow by doubling, so a step writes only its new positions
        self.kv: dict[int, list[list[torch.Tensor]]] = {}
        self.length: dict[int, int] = {}
        self.pending: dict[int, list[torch.Tensor]] = {}   # rid → features queued since its last proposal

    def _queue(self, rid: int, feats: torch.Tensor | None) -> None:
        if feats is not None:
            self.pending.setdefault(rid, []).append(feats)

    @torch.no_grad()
    def _catch_up(self, rids: list[int]) -> None:
        """Run the context projection over the queued features of `rids` and append their keys/values:
        one pass for all of them (the projection, the key norm and RoPE act per position)."""
        todo = [(rid, self.pending.pop(rid, [])) for rid in rids]
        todo = [(rid, parts) for rid, parts in todo if parts or rid not in self.kv]
        if not todo:
            return
        head = self.head
        like = head.context_norm.weight   # the head's dtype and device (its matrices may be int8)
        feats = [torch.cat(parts) if parts else like.new_zeros(0, head.context_proj.in_features) for _, parts in todo]
        starts = [self.length.get(rid, 0) for rid, _ in todo]
        pos = torch.cat([torch.arange(s, s + len(f)) for s, f in zip(starts, feats)]).to(like.device)
        new = head.context_kv(head.project_context(torch.cat(feats)[None]), pos[None])
        offset = 0
        for (rid, _), start, f in zip(todo, starts, feats):
            n = len(f)
            self._write(rid, start, [[x[:, offset:offset + n] for x in kv] for kv in new])
            offset += n

    def _write(self, rid: int, start: int, new: list[list[torch.Tensor]]) -> None:
        """Put per-layer [keys, values] (1, n, kv, hd) at positions start.. of the request's buffers."""
        n = new[0][0].shape[1]
        bufs = self.kv.get(rid)
        if bufs is None or bufs[0][0].shape[1] < start + n:
            cap = max(2 * (start + n), 64)
            grown = [[k.new_empty((1, cap, *k.shape[2:])) for k in kv] for kv in new]
            for old, fresh in zip(bufs or [], grown):
                for o, f in zip(old, fresh):
                    f[:, :start] = o[:, :start]
            self.kv[rid] = bufs = grown
        for buf, kv in zip(bufs, new):
            for b, x in zip(buf, kv):
                b[:, start:start + n] = x
        self.length[rid] = start + n

    def _length(self, rid: int) -> int:
        """Context positions known for a request, queued ones included (the anchor's position)."""
        return self.length.get(rid, 0) + sum(len(f) for f in self.pending.get(rid, ()))

    def _context(self, rids: list[int], lens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the (R, width, kv, hd) keys and values of the requests, zero-padded on the right
        (views of the buffers when there is one request)."""
        width = max(lens)
        if len(rids) == 1:
            return [(k[:, :width], v[:, :width]) for k, v in self.kv[rids[0]]]
        out = []
        for layer_idx in range(len(self.head.layers)):
            k0 = self.kv[rids[0]][layer_idx][0]
            ks = k0.new_zeros((len(rids), width, *k0.shape[2:]))
            vs = torch.zeros_like(ks)
            for j, (rid, n) in enumerate(zip(rids, lens)):
                k, v = self.kv[rid][layer_idx]
                ks[j, :n], vs[j, :n] = k[0, :n], v[0, :n]
            out.append((ks, vs))
        return out

    def start(self, states, features):
        for i, s in enumerate(states):
            self.finish(s)
            feats = features[i] if features is not None else torch.zeros(0, self.head.context_proj.in_features)
            self._queue(s.rid, feats.to(self.head.context_norm.weight.device))

    def update(self, states, accepted, features):
        for i, s in enumerate(states):
            self._queue(s.rid, None if features is None else features[i])

    def finish(self, state):
        self.kv.pop(state.rid, None)
        self.length.pop(state.rid, None)
        self.pending.pop(state.rid, None)

    def propose_rows(self, states, limits, rows, out):
        head, g = self.head, self.head.config.gamma
        dev = head.context_norm.weight.device
        self._catch_up([states[i].rid for i in rows])
        lens = [self.length[states[i].rid] for i in rows]
        width = max(lens)
        kv = self._context([states[i].rid for i in rows], lens)
        anchors = torch.tensor([states[i].tokens[-1] for i in rows], device=dev)
        pos = block_positions(torch.tensor([len(states[i].tokens) - 1 for i in rows], device=dev), g)
        mask = None   # one request: its block sees its whole context and itself, nothing to mask
        if len(rows) > 1:
            ctx_ok = torch.arange(width, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
            mask = torch.cat([ctx_ok[:, None, :].expand(-1, g, -1),
                              torch.ones(len(rows), g, g, dtype=torch.bool, device=dev)], -1)
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
