"""DSpark draft head: parallel backbone + sequential chunk head + confidence head.

Paper: "DSpark: Confidence-Scheduled Speculative Decoding with Semi-Autoregressive Generation"
(DeepSeek-AI and Peking University, arXiv 2607.05147). DFlash is the same backbone without the
sequential head (`sequential_head: none`).

Block convention. The anchor x_n (the last token the target produced, at position n) and γ−1 mask
embeddings at positions n+1 … n+γ−1 run through the backbone in one pass; the output at block index
i predicts x_{n+1+i}, so one block drafts γ tokens. Keys/values of every layer are the projected
target features at positions < n (the context) followed by the block's own states; the block
attends to itself bidirectionally. The target's embedding and LM head are shared and frozen: they
are attached at run time (`attach`) and never saved. An optional reduced draft vocabulary (`d2t`,
draft id → target id, saved with the head) cuts the LM-head cost; a target token outside it can
never be drafted, so verification counts it as a rejection.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dspark.core.errors import DSparkError

from .head_base import DraftHeadBase, HeadConfigBase, target_fields

SEQUENTIAL_HEADS = ("markov", "rnn", "none")


@dataclass
class DSparkConfig(HeadConfigBase):
    label = "DSpark"                      # (not a field) names the kind in config errors
    target: str = ""                      # name of the target this head belongs to
    target_name_or_path: str = ""         # its Hub id or folder when known (written by dspark export)
    target_revision: str = ""             # its Hub revision when known (written by dspark export)
    target_hidden_size: int = 576
    target_vocab_size: int = 49152
    target_num_layers: int = 30
    target_layer_ids: list = field(default_factory=lambda: [2, 8, 15, 22, 29])   # hidden_states indices
    num_layers: int = 2
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    gamma: int = 7                        # drafted tokens per block (anchor + γ−1 masks)
    sequential_head: str = "markov"       # markov | rnn | none (= DFlash)
    head_rank: int = 64                   # Markov rank r / RNN state width
    draft_vocab_size: int = 0             # 0 = the target's whole vocabulary
    confidence_temperatures: list = field(default_factory=list)   # STS, one per block position (dspark calibrate)
    qk_norm: bool = False                 # per-head RMSNorm of queries and keys before RoPE (speculators/vLLM)
    mask_token_id: int = -1               # mask positions embed this target token (frozen); −1: a learned vector
    model_type: str = "dspark"

    def __post_init__(self):
        if self.sequential_head not in SEQUENTIAL_HEADS:
            raise DSparkError(f"sequential_head '{self.sequential_head}' is unknown: choose from {SEQUENTIAL_HEADS}")
        if self.target_hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise DSparkError(f"draft heads {self.num_attention_heads}/{self.num_key_value_heads} do not divide "
                              f"hidden size {self.target_hidden_size}: pick compatible head counts")
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        self.draft_vocab_size = int(self.draft_vocab_size or self.target_vocab_size)
        self.confidence_temperatures = [float(t) for t in self.confidence_temperatures]
        if not -1 <= self.mask_token_id < self.target_vocab_size:
            raise DSparkError(f"mask_token_id {self.mask_token_id} is outside the target's vocabulary "
                              f"(0..{self.target_vocab_size - 1}, or -1 for a learned mask vector)")
        if any(not t > 0 for t in self.confidence_temperatures):
            raise DSparkError(f"confidence_temperatures must be > 0 (got {self.confidence_temperatures}): "
                              "re-run `dspark calibrate`")

    @property
    def kind(self) -> str:
        return "dflash" if self.sequential_head == "none" else "dspark"



class RMSNorm(nn.Module):
    is_llama_rmsnorm = True   # Llama's arithmetic: the bf16 CPU kernel may run it (models/cpu_gemm.py)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _inv_freq(d: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)


_cached_inv_freq = functools.lru_cache(maxsize=8)(_inv_freq)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half layout). x: (B, N, h, d); pos: (B, N)."""
    d = x.shape[-1]
    # eager calls reuse the frequencies; a compiled graph (draft_compile) folds them in as constants
    inv = (_inv_freq if torch.compiler.is_compiling() else _cached_inv_freq)(d, float(theta), x.device)
    ang = pos.float()[..., None] * inv                               # (B, N, d/2)
    cos, sin = torch.cat([ang, ang], -1).cos()[:, :, None], torch.cat([ang, ang], -1).sin()[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Block queries over [context keys ; block keys]; grouped-query, Llama weight names."""

    def __init__(self, c: DSparkConfig):
        super().__init__()
        d, h, kv, hd = c.target_hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.h, self.kv, self.hd, self.theta = h, kv, hd, c.rope_theta
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        if c.qk_norm:   # per head, before RoPE (as speculators' / vLLM's DSpark layers)
            self.q_norm, self.k_norm = RMSNorm(hd, c.rms_norm_eps), RMSNorm(hd, c.rms_norm_eps)

    def kv_of(self, x, pos):
        """Keys (rotated) and values of states x (B, N, D) at positions pos (B, N) → 2 × (B, N, kv, hd)."""
        b, n, _ = x.shape
        k = self.k_proj(x).view(b, n, self.kv, self.hd)
        k = rope(self.k_norm(k) if hasattr(self, "k_norm") else k, pos, self.theta)
        return k, self.v_proj(x).view(b, n, self.kv, self.hd)

    def forward(self, x, pos, ctx_kv, mask):
        """x: (B, Q, D) block states; ctx_kv: keys/values (B, C, kv, hd) of the context;
        mask: (B, Q, C + Q) bool, True = may attend; None: every query sees every key."""
        b, q, _ = x.shape
        qs = self.q_proj(x).view(b, q, self.h, self.hd)
        qs = rope(self.q_norm(qs) if hasattr(self, "q_norm") else qs, pos, self.theta)
        kb, vb = self.kv_of(x, pos)
        k = torch.cat([ctx_kv[0], kb], 1).transpose(1, 2)              # (B, kv, C+Q, hd)
        v = torch.cat([ctx_kv[1], vb], 1).transpose(1, 2)
        out = F.scaled_dot_product_attention(qs.transpose(1, 2), k, v, enable_gqa=self.h != self.kv,
                                             attn_mask=None if mask is None else mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))


class MLP(nn.Module):
    def __init__(self, c: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.target_hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.target_hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.target_hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DSparkConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.target_hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.target_hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, pos, ctx_kv, mask):
        x = x + self.self_attn(self.input_layernorm(x), pos, ctx_kv, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    """bias_k = W2ᵀ·W1[x_{k−1}]: a rank-r bigram correction of the base logits."""

    def __init__(self, c: DSparkConfig):
        super().__init__()
        self.up_proj = nn.Linear(c.head_rank, c.draft_vocab_size, bias=False)   # W2
        nn.init.zeros_(self.up_proj.weight)

    def forward(self, h, prev, state=None):
        return self.up_proj(prev), None


class RNNHead(nn.Module):
    """A gated recurrent state over the block's tokens and backbone states produces the bias."""

    def __init__(self, c: DSparkConfig):
        super().__init__()
        r = c.head_rank
        self.in_proj = nn.Linear(c.target_hidden_size + r, 2 * r)
        self.up_proj = nn.Linear(r, c.draft_vocab_size, bias=False)
        nn.init.zeros_(self.up_proj.weight)

    def forward(self, h, prev, state=None):
        z, u = self.in_proj(torch.cat([h, prev], -1)).chunk(2, -1)
        z = torch.sigmoid(z)
        state = (1 - z) * torch.tanh(u) if state is None else z * state + (1 - z) * torch.tanh(u)
        return self.up_proj(state), state


class DSparkDraft(DraftHeadBase, nn.Module):
    """The draft head. Trainable: context projection, backbone, sequential head, confidence head (and
    a learned mask vector when mask_token_id = −1). Shared and frozen (attached, not saved): the
    target's embedding (which also gives the mask input) and LM head."""

    config_class = DSparkConfig
    architecture = "dspark"
    compiled_methods = ("backbone", "sample_block")   # a proposal's hot path (inference/compiled_head.py)
    markov_greedy = None   # greedy Markov blocks in one call: the runtime's drafters may set models/cpu_gemm's

    @classmethod
    def from_draft_cfg(cls, d, target, d2t) -> "DSparkDraft":
        """A fresh head from a `conf/draft` size; unset widths follow the target."""
        mask = d.get("mask_token_id", "auto")
        config = DSparkConfig(**target_fields(d, target), num_layers=d.num_layers, gamma=d.gamma,
                              target_layer_ids=list(d.target_layer_ids or default_layer_ids(target.num_layers)),
                              sequential_head=d.sequential_head, head_rank=d.head_rank,
                              draft_vocab_size=0 if d2t is None else len(d2t), qk_norm=bool(d.get("qk_norm")),
                              mask_token_id=target.spare_token_id() if mask == "auto" else
                              -1 if mask is None else int(mask))
        head = cls(config, d2t).attach(target)
        if d.get("init_from_target"):
            head.init_from_target(target)
        return head

    def __init__(self, config: DSparkConfig, d2t: torch.Tensor | None = None):
        super().__init__()
        c = self.config = config
        d, k = c.target_hidden_size, len(c.target_layer_ids)
        self.context_proj = nn.Linear(k * d, d, bias=False)
        self.context_norm = RMSNorm(d, c.rms_norm_eps)
        if c.mask_token_id < 0:   # heads trained before the serving-compatible mask: a learned vector
            self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(d, c.rms_norm_eps)
        r = c.head_rank
        if c.sequential_head != "none":
            self.token_embed = nn.Embedding(c.draft_vocab_size + 1, r)   # W1; last row: token outside d2t
            self.chunk_head = MarkovHead(c) if c.sequential_head == "markov" else RNNHead(c)
        self.confidence = nn.Linear(d + (r if c.sequential_head != "none" else 0), 1)
        self.init_vocabulary(d2t)

    def init_from_target(self, target) -> None:
        """Copy the target's top decoder layers into the backbone (same Llama shapes required; q/k norms,
        which Llama layers lack, start at 1)."""
        src = target.model.model.layers[-len(self.layers):]
        for mine, theirs in zip(self.layers, src):
            missing = mine.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()}, strict=False)
            if [k for k in missing.missing_keys if not k.startswith(("self_attn.q_norm.", "self_attn.k_norm."))]:
                raise DSparkError(f"cannot initialise from the target: its layers lack {missing.missing_keys}")

    # ------------------------------------------------------------------ backbone
    def project_context(self, feats: torch.Tensor) -> torch.Tensor:
        """(…, k·H) concatenated target hidden states → (…, D) context states."""
        return self.context_norm(self.context_proj(feats.to(self.context_norm.weight.dtype)))

    def context_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> list[tuple]:
        """Per-layer keys/values of projected context ctx (B, C, D) at positions pos (B, C)."""
        return [layer.self_attn.kv_of(ctx, pos) for layer in self.layers]

    def block_inputs(self, anchors: torch.Tensor) -> torch.Tensor:
        """anchors (…,) target ids → (…, γ, D): anchor embedding then γ−1 mask embeddings."""
        dtype, m = self.context_norm.weight.dtype, self.config.mask_token_id
        emb = F.embedding(anchors, self.embed_weight).to(dtype)
        mask = self.mask_embedding if m < 0 else self.embed_weight[m].to(dtype)
        masks = mask.expand(*anchors.shape, self.config.gamma - 1, -1)
        return torch.cat([emb[..., None, :], masks], -2)

    def backbone(self, x, pos, ctx_kv, mask) -> torch.Tensor:
        """x: (B, Q, D) block inputs at positions pos (B, Q) → (B, Q, D) final-normed states."""
        for layer, kv in zip(self.layers, ctx_kv):
            x = layer(x, pos, kv, mask)
        return self.norm(x)

    def packed_blocks(self, feats, input_ids, anchors, ctx_valid) -> torch.Tensor:
        """Training with anchor packing: a sequence's context is projected once and A blocks run in
        one pass under a block-sparse mask (block a sees context < n_a and its own γ positions).
        feats (B, L, k·H), input_ids (B, L), anchors (B, A) positions, ctx_valid (B, L) → (B, A, γ, D)."""
        b, n_ctx = input_ids.shape
        a, g = anchors.shape[1], self.config.gamma
        dev = anchors.device
        ctx_pos = torch.arange(n_ctx, device=dev).expand(b, -1)
        kv = self.context_kv(self.project_context(feats), ctx_pos)
        x = self.block_inputs(input_ids.gather(1, anchors)).reshape(b, a * g, -1)        # (B, A·γ, D)
        pos = block_positions(anchors, g).reshape(b, a * g)
        sees_ctx = (ctx_pos[:, None, :] < anchors.repeat_interleave(g, 1)[:, :, None]) & ctx_valid[:, None, :]
        blk = torch.arange(a, device=dev).repeat_interleave(g)
        sees_blk = (blk[:, None] == blk[None, :]).expand(b, -1, -1)
        h = self.backbone(x, pos, kv, torch.cat([sees_ctx, sees_blk], -1))
        return h.view(b, a, g, -1)

    def forward(self, feats, input_ids, anchors, ctx_valid, prev_ids):
        """Training pass (teacher forcing): packed blocks, then heads. prev_ids (B, A, γ) target ids of
        the token before each drafted position (anchor, then labels) → draft logits (B, A, γ, Vd) and
        confidence logits (B, A, γ)."""
        return self.teacher_forced(self.packed_blocks(feats, input_ids, anchors, ctx_valid), prev_ids)

    # ------------------------------------------------------------------ heads
    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits_linear(h, self.lm_weight.to(h.dtype))                    # (…, Vd)

    def prev_embedding(self, prev_draft_ids: torch.Tensor) -> torch.Tensor | None:
        return self.token_embed(prev_draft_ids) if self.config.sequential_head != "none" else None

    def chunk_bias(self, h_k, prev_k, state=None):
        """One block position's logit bias from the sequential head (0 without one) and its new state."""
        if prev_k is None:
            return 0.0, None
        return self.chunk_head(h_k, prev_k, state)

    def confidence_logits(self, h: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """h (…, γ, D) and the previous tokens' embeddings (…, γ, E) (None without a sequential head) →
        confidence logits (…, γ), all positions in one pass."""
        return self.confidence(h if prev is None else torch.cat([h, prev], -1))[..., 0]

    def teacher_forced(self, h: torch.Tensor, prev_target_ids: torch.Tensor):
        """Training: h (…, γ, D), previous tokens (…, γ) as target ids (anchor, then labels) →
        logits (…, γ, Vd) and confidence logits (…, γ)."""
        base = self.base_logits(h)
        prev = self.prev_embedding(self.t2d[prev_target_ids])
        logits, state = [], None
        for k in range(h.shape[-2]):
            bias, state = self.chunk_bias(h[..., k, :], None if prev is None else prev[..., k, :], state)
            logits.append(base[..., k, :] + bias)
        return torch.stack(logits, -2), self.confidence_logits(h, prev)

    def confidence_temperature(self, k: int) -> float:
        """STS temperature of block position k (1.0 until calibrated; the last one beyond the list)."""
        t = self.config.confidence_temperatures
        return t[min(k, len(t) - 1)] if t else 1.0

    @torch.no_grad()
    def sample_block(self, h: torch.Tensor, anchors: torch.Tensor, temperature: float,
                     generator: torch.Generator | None = None):
        """Inference: h (R, γ, D), anchors (R,) target ids → draft ids (R, γ), probs (R, γ, Vd) or
        None when greedy, confidences (R, γ); sampled left to right through the sequential head."""
        base, first = self.base_logits(h), self.t2d[anchors]
        toks = probs = None
        if temperature <= 0 and self.markov_greedy is not None and self.config.sequential_head == "markov":
            toks = self.markov_greedy(base, self.token_embed.weight, self.chunk_head.up_proj.weight, first)
        if toks is None:
            toks, probs = self._sample_loop(h, base, first, temperature, generator)
        prev = self.prev_embedding(torch.cat([first[:, None], toks[:, :-1]], 1))
        # the confidences need no sampling: one pass over every position once the tokens are known
        c = self.confidence_logits(h, prev).float()
        temps = torch.tensor([self.confidence_temperature(k) for k in range(h.shape[1])], device=c.device)
        return toks, probs, torch.sigmoid(c / temps)

    def _sample_loop(self, h: torch.Tensor, base: torch.Tensor, first: torch.Tensor, temperature: float,
                     generator: torch.Generator | None):
        """The block's tokens left to right after the anchors' draft ids `first` (R,): (R, γ) draft ids, and
        (R, γ, Vd) probs when sampling."""
        prev_ids, state = first, None
        toks, probs = [], []
        for k in range(base.shape[1]):
            bias, state = self.chunk_bias(h[:, k], self.prev_embedding(prev_ids), state)
            logits = (base[:, k] + bias).float()
            if temperature > 0:
                p = torch.softmax(logits / temperature, -1)
                tok = torch.multinomial(p.cpu(), 1, generator=generator)[:, 0].to(p.device)
                probs.append(p)
            else:
                tok = logits.argmax(-1)
            toks.append(tok)
            prev_ids = tok
        return torch.stack(toks, 1), torch.stack(probs, 1) if probs else None


def default_layer_ids(num_layers: int, k: int = 5) -> list[int]:
    """k hidden_states indices spread from layer 2 to layer num_layers − 1 (SmolLM2: 2, 8, 15, 22, 29)."""
    if num_layers < 3:
        return [1]
    return sorted({int(2 + i * (num_layers - 3) / max(k - 1, 1)) for i in range(k)})


def block_positions(anchor_pos: torch.Tensor, gamma: int) -> torch.Tensor:
    """(…,) anchor positions → (…, γ) positions of the block."""
    return anchor_pos[..., None] + torch.arange(gamma, device=anchor_pos.device)
