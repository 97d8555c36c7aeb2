"""The trained EAGLE-3 head as a runtime drafter.

Per request it keeps the draft layer's keys/values of every *committed* entry (token x_j with the
target's feature f_{j−1}, both final, at position j ≥ 1; there is no entry for x_0, as in speculators
and vLLM, see models/eagle3.py) and the target features not yet turned into entries. A proposal runs,
batched over requests, one pass over each request's pending entries up to its anchor (they are
committed; the last one's output drafts the first token), then one single-position step per further
drafted token on the draft's own features; those speculative entries are dropped afterwards, since
verification decides which tokens become real. So a proposal of γ tokens costs γ passes of one layer.
A request with no entry yet (a one-token prompt, before its first step) proposes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.models.eagle3 import Eagle3Draft

from .drafters import HeadDrafter, Proposal


class Eagle3Drafter(HeadDrafter):
    def __init__(self, head: Eagle3Draft, target, temperature: float = 0.0, seed: int = 0, draft_weights: str = "native",
                 draft_compile: bool = False):
        super().__init__(head, target, temperature, seed, draft_weights, draft_compile)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # rid → committed keys/values (1, c, kv, hd)
        self.pending: dict[int, torch.Tensor] = {}                   # rid → features f_c … (m, k·H)

    def _committed(self, rid: int) -> int:
        """c: the committed entries are those of x_1 … x_c (positions 1 … c)."""
        return self.kv[rid][0].shape[1] if rid in self.kv else 0

    def start(self, states, features):
        width = self.head.fc.in_features
        for i, s in enumerate(states):
            self.kv.pop(s.rid, None)
            feats = features[i] if features is not None else torch.zeros(0, width)
            self.pending[s.rid] = feats.to(self.head.device)             # f_0 … for the entries of x_1 …

    def update(self, states, accepted, features):
        for i, s in enumerate(states):
            if features is not None:
                self.pending[s.rid] = torch.cat([self.pending[s.rid], features[i].to(self.head.device)])

    def finish(self, state):
        self.kv.pop(state.rid, None)
        self.pending.pop(state.rid, None)

    @torch.no_grad()
    def _draw(self, logits: torch.Tensor):
        """(R, Vd) logits → draft ids (R,), probs (R, Vd) or None when greedy, top-probability confidences (R,)."""
        logits = logits.float()
        if self.temperature > 0:
            p = torch.softmax(logits / self.temperature, -1)
            tok = torch.multinomial(p.cpu(), 1, generator=self.gen)[:, 0].to(p.device)
            return tok, p, p.max(-1).values
        return logits.argmax(-1), None, torch.softmax(logits, -1).max(-1).values

    def propose_rows(self, states, limits, rows, out):
        head, dev = self.head, self.head.device
        rows = [i for i in rows if len(self.pending[states[i].rid])]   # the others have no entry to draft from
        if not rows:
            return
        r = len(rows)
        # committed entries, right-padded to a common width
        lens = [self._committed(states[i].rid) for i in rows]
        width = max(lens)
        kvh, hd = head.config.num_key_value_heads, head.config.head_dim
        dtype = head.norm.weight.dtype   # the target's (bf16 on SmolLM2): keys must match the queries
        past_k = torch.zeros(r, width, kvh, hd, device=dev, dtype=dtype)
        past_v = torch.zeros(r, width, kvh, hd, device=dev, dtype=dtype)
        for j, (i, n) in enumerate(zip(rows, lens)):
            if n:
                past_k[j, :n], past_v[j, :n] = self.kv[states[i].rid][0][0], self.kv[states[i].rid][1][0]
        past_ok = torch.arange(width, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
        # pass 1: the pending entries x_{c+1} … (committed from now on); the last (the anchor) drafts token 1
        feats = [self.pending[states[i].rid] for i in rows]
        counts = [len(f) for f in feats]
        p = max(counts)
        ids = torch.zeros(r, p, dtype=torch.long, device=dev)
        for j, (i, n, m) in enumerate(zip(rows, lens, counts)):
            ids[j, :m] = torch.tensor(states[i].tokens[n + 1:n + 1 + m], device=dev)
        hid = head.project(torch.stack([F.pad(f, (0, 0, 0, p - len(f))) for f in feats]))
        pos = torch.tensor(lens, device=dev)[:, None] + 1 + torch.arange(p, device=dev)
        new_ok = torch.arange(p, device=dev)[None, :] < torch.tensor(counts, device=dev)[:, None]
        causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([past_ok[:, None, :].expand(-1, p, -1), causal[None] & new_ok[:, None, :]], -1)
        h, (k, v) = head.step(ids, hid, pos, (past_k, past_v), mask)
        for j, (i, n, m) in enumerate(zip(rows, lens, counts)):
            rid = states[i].rid
            old = self.kv.get(rid)
            self.kv[rid] = (k[j:j + 1, :m], v[j:j + 1, :m]) if old is None else \
                (torch.cat([old[0], k[j:j + 1, :m]], 1), torch.cat([old[1], v[j:j + 1, :m]], 1))
            self.pending[rid] = self.pending[rid][m:]
        last = torch.tensor(counts, device=dev) - 1
        h = h[torch.arange(r, device=dev), last][:, None]                        # (R, 1, D)
        keys_k, keys_v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        ok = torch.cat([past_ok, new_ok], 1)
        pos = pos[torch.arange(r, device=dev), last][:, None]                    # the anchors' positions
        toks, probs, confs = [], [], []
        for step in range(max(limits[i] for i in rows)):
            if step:   # the previous draft token with the previous output as its feature
                ok = torch.cat([ok, torch.ones(r, 1, dtype=torch.bool, device=dev)], 1)
                h, (k1, v1) = head.step(head.d2t[toks[-1]][:, None], h, pos + step, (keys_k, keys_v), ok[:, None, :])
                keys_k, keys_v = torch.cat([keys_k, k1], 1), torch.cat([keys_v, v1], 1)
            tok, prob, conf = self._draw(head.logits(h[:, 0]))
            toks.append(tok)
            confs.append(conf)
            if prob is not None:
                probs.append(prob)
        toks = head.d2t[torch.stack(toks, 1)].tolist()
        confs = torch.stack(confs, 1).tolist()
        probs = torch.stack(probs, 1) if probs else None
        for j, i in enumerate(rows):
            n = limits[i]
            full = None
            if probs is not None:
                full = torch.zeros(n, self.vocab_size, device=probs.device)
                full[:, head.d2t] = probs[j, :n]
            out[i] = Proposal(tokens=toks[j][:n], probs=full, confidences=confs[j][:n])
