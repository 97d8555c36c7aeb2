"""EAGLE-3 draft head: one decoder layer over [fused target features ; token embedding], autoregressive.

Paper: "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test"
(Li, Wei, Zhang, Zhang; arXiv 2503.01840). The baseline the DSpark paper compares against.

Position convention (that of EAGLE-3's reference code, `speculators` and vLLM). The draft entry at
position j ≥ 1 pairs the token x_j with the feature that predicted it: fc(concat of the target's
hidden states at `target_layer_ids`, position j−1); in their numbering it is entry j−1, (x_j, g_{j−1},
position j). There is no entry for x_0 (it would have no feature), so x_1 is never drafted and x_0 only
reaches the head through the target's features. Inside the layer both halves are normalised and
concatenated, [input_layernorm(emb) ; hidden_norm(feature)] (width 2·D), before q/k/v; the residual
stream is the feature. The layer's pre-norm output at j predicts x_{j+1} through norm → the target's
LM head, and is itself the feature of the next draft step: drafting γ tokens after the anchor x_n
(n ≥ 1) costs γ single-position steps, the first over the true features, the others over the draft's
own (what training-time test trains for). For the same weights our logits equal speculators' (within
4e-6 in fp32, tests/test_speculators.py).

Heads trained before this convention had an extra context entry (x_0, zero feature) at position 0. They
load and run unchanged (same weights and shapes), but every draft now omits that entry, so their
drafts differ slightly from what they were trained on, which may lower their acceptance a little
(retrain to remove the mismatch). Losslessness does not depend on it.

The target's embedding and LM head are shared and frozen: attached at run time (`attach`) and never
saved. An optional reduced draft vocabulary (`d2t`, draft id → target id, saved with the head) cuts
the LM-head cost; a target token outside it can never be drafted.

hub/layouts.py writes the head in the speculators layout vLLM loads and in SGLang's EAGLE-3 layout
(field mapping in docs/serving.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dspark.core.errors import DSparkError

from .dspark import MLP, RMSNorm, rope
from .head_base import DraftHeadBase, HeadConfigBase, target_fields


@dataclass
class Eagle3Config(HeadConfigBase):
    label = "EAGLE-3"                     # (not a field) names the kind in config errors
    target: str = ""                      # name of the target this head belongs to
    target_hidden_size: int = 576
    target_vocab_size: int = 49152
    target_num_layers: int = 30
    target_layer_ids: list = field(default_factory=lambda: [2, 15, 27])   # low / mid / high hidden_states indices
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    gamma: int = 7                        # training-time-test steps (tokens drafted per anchor in training)
    draft_vocab_size: int = 0             # 0 = the target's whole vocabulary
    model_type: str = "eagle3"

    def __post_init__(self):
        if self.target_hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise DSparkError(f"draft heads {self.num_attention_heads}/{self.num_key_value_heads} do not divide "
                              f"hidden size {self.target_hidden_size}: pick compatible head counts")
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if not self.target_layer_ids:
            raise DSparkError("an EAGLE-3 head needs at least one target layer id (target_layer_ids)")
        self.draft_vocab_size = int(self.draft_vocab_size or self.target_vocab_size)

    @property
    def kind(self) -> str:
        return "eagle3"



def eagle3_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low / mid / high hidden_states indices: 2, L/2, L−3 (SmolLM2: 2, 15, 27), deduplicated."""
    return sorted({min(max(i, 1), num_layers) for i in (2, num_layers // 2, num_layers - 3)})


class Eagle3Attention(nn.Module):
    """Grouped-query attention whose q/k/v read the 2·D-wide [embedding ; feature] input."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        d, h, kv, hd = c.target_hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.h, self.kv, self.hd, self.theta = h, kv, hd, c.rope_theta
        self.q_proj = nn.Linear(2 * d, h * hd, bias=False)
        self.k_proj = nn.Linear(2 * d, kv * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def kv_of(self, x, pos):
        """Keys (rotated) and values of inputs x (B, N, 2D) at positions pos (B, N) → 2 × (B, N, kv, hd)."""
        b, n, _ = x.shape
        return rope(self.k_proj(x).view(b, n, self.kv, self.hd), pos, self.theta), self.v_proj(x).view(b, n, self.kv, self.hd)

    def forward(self, x, pos, past, mask):
        """x: (B, T, 2D) at positions pos (B, T); past: keys/values (B, P, kv, hd) or None;
        mask: (B, T, P + T) bool, True = may attend → (B, T, D) and the new keys/values (B, T, kv, hd)."""
        b, t, _ = x.shape
        q = rope(self.q_proj(x).view(b, t, self.h, self.hd), pos, self.theta)
        k, v = self.kv_of(x, pos)
        ks, vs = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
        rep = self.h // self.kv
        ks = ks.transpose(1, 2).repeat_interleave(rep, 1)               # (B, h, P+T, hd)
        vs = vs.transpose(1, 2).repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class Eagle3Layer(nn.Module):
    """EAGLE-3's `midlayer`: Llama layer with a second input norm; residual stream = the feature."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.target_hidden_size, c.rms_norm_eps)    # on the token embedding
        self.hidden_norm = RMSNorm(c.target_hidden_size, c.rms_norm_eps)        # on the feature
        self.self_attn = Eagle3Attention(c)
        self.post_attention_layernorm = RMSNorm(c.target_hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def inputs(self, emb, hid):
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(hid)], -1)   # (B, T, 2D)

    def forward(self, emb, hid, pos, past, mask):
        a, kv = self.self_attn(self.inputs(emb, hid), pos, past, mask)
        h = hid + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Eagle3Draft(DraftHeadBase, nn.Module):
    """The draft head. Trainable: fc, midlayer, norm. Shared and frozen (attached, not saved): the
    target's embedding and LM head (rows of the draft vocabulary)."""

    config_class = Eagle3Config
    architecture = "eagle3"
    compiled_methods = ("step", "logits")   # a proposal's hot path (inference/compiled_head.py)

    @classmethod
    def from_draft_cfg(cls, d, target, d2t) -> "Eagle3Draft":
        """A fresh head from `conf/draft/eagle3.yaml`; unset widths follow the target."""
        if d.get("num_layers", 1) != 1:
            raise DSparkError(f"an EAGLE-3 head has one decoder layer (draft.num_layers={d.num_layers}): drop the override")
        config = Eagle3Config(**target_fields(d, target), gamma=d.gamma,
                              target_layer_ids=list(d.target_layer_ids or eagle3_layer_ids(target.num_layers)),
                              draft_vocab_size=0 if d2t is None else len(d2t))
        return cls(config, d2t).attach(target)

    def __init__(self, config: Eagle3Config, d2t: torch.Tensor | None = None):
        super().__init__()
        c = self.config = config
        d, k = c.target_hidden_size, len(c.target_layer_ids)
        self.fc = nn.Linear(k * d, d, bias=False)
        self.midlayer = Eagle3Layer(c)
        self.norm = RMSNorm(d, c.rms_norm_eps)
        self.init_vocabulary(d2t)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # ------------------------------------------------------------------ one layer, any number of positions
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Target token ids (…) → (…, D) frozen target embeddings."""
        return F.embedding(ids, self.embed_weight).to(self.norm.weight.dtype)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(…, k·H) concatenated target hidden states → (…, D) fused feature."""
        return self.fc(feats.to(self.norm.weight.dtype))

    def step(self, ids, hid, pos, past, mask):
        """Draft entries for tokens ids (B, T) with features hid (B, T, D) at positions pos (B, T) over
        cached keys/values past (B, P, kv, hd) or None; mask (B, T, P+T) → pre-norm states (B, T, D)
        (each the next entry's feature) and the entries' keys/values."""
        return self.midlayer(self.embed(ids), hid, pos, past, mask)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-norm states (…, D) → draft-vocabulary logits (…, Vd)."""
        h = self.norm(h)
        return self.logits_linear(h, self.lm_weight.to(h.dtype))

    # ------------------------------------------------------------------ training: training-time test
    def forward(self, feats, input_ids, anchors, ctx_valid, block_ids):
        """Training-time test with anchor packing. feats (B, L, k·H) target states, input_ids (B, L),
        anchors (B, A) positions n, ctx_valid (B, L), block_ids (B, A, γ) target ids x_n … x_{n+γ−1}
        (the anchor, then the true next tokens) → draft logits (B, A, γ, Vd) for x_{n+1} … x_{n+γ}.

        The true entries' keys/values are computed once for the whole sequence (the layer's output is
        needed only at the anchors). Step s (0-based) runs the anchors' queries only: the entry of
        x_{n+s}, whose feature is the true f_{n−1} at s = 0 and the anchor's previous output after, sees
        the true entries 1 … n−1 and that anchor's own entries of steps 0…s, as at run time. Position 0
        holds no entry (see the module docstring): no query sees it, and an anchor n = 0 drafts from
        nothing, so its logits are meaningless (the objective drops such blocks)."""
        b, n_ctx = input_ids.shape
        a, g = anchors.shape[1], block_ids.shape[-1]
        dev = anchors.device
        ctx_pos = torch.arange(n_ctx, device=dev).expand(b, -1)
        hid = self.project(F.pad(feats, (0, 0, 1, 0))[:, :-1])                       # entry j: f_{j−1} (j ≥ 1)
        k, v = self.midlayer.self_attn.kv_of(self.midlayer.inputs(self.embed(input_ids), hid), ctx_pos)
        h = hid.gather(1, anchors[..., None].expand(-1, -1, hid.shape[-1]))         # (B, A, D) f_{n−1}
        entry = ctx_valid & (ctx_pos > 0)                                            # no entry at position 0
        sees_ctx = (ctx_pos[:, None, :] < anchors[:, :, None]) & entry[:, None, :]   # (B, A, L)
        own = torch.eye(a, dtype=torch.bool, device=dev)
        out = []
        for s in range(g):
            mask = torch.cat([sees_ctx, own.repeat(1, s + 1).expand(b, -1, -1)], -1)   # (B, A, L + A·(s+1))
            h, (k_s, v_s) = self.step(block_ids[..., s], h, anchors + s, (k, v), mask)
            k, v = torch.cat([k, k_s], 1), torch.cat([v, v_s], 1)
            out.append(self.logits(h))
        return torch.stack(out, -2)
