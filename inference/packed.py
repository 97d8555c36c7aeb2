"""Packed ragged verification: each row runs exactly its admitted tokens through the target.

A verification step gives row r its anchor plus ℓ_r drafts, T_r = 1 + ℓ_r tokens. The padded step runs
R × max_r T_r tokens through every linear layer; the packed step runs B = Σ_r T_r, flattened into one
sequence of batch 1, so the weights' matmuls cost what was admitted. Attention still needs each row's own
cache: the custom attention function below scatters the B queries back into an (R, width) grid (a few
kilobytes), attends over the shared slot cache with a per-row causal mask, and gathers the B outputs —
the same operations as Hugging Face's eager attention (grouped, models/attention.py), so logits match the
padded step's. Only targets whose eager attention that core computes pack (`groupable`).

The slot layout of the cache does not change (inference/cache.py): every row still gets `width` new
slots, its unused ones are holes; only the packed tokens' keys and values are written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from dspark.models.attention import grouped_attention
from dspark.models.cpu_gemm import runs_kernel

ATTENTION = "dspark_packed"
PACK_BELOW = 0.75   # pack when B ≤ this × R × width: packed/padded 0.55–0.95 there, 1.04 nearly full (SmolLM2)


def packs(tokens: int, rows: int, width: int) -> bool:
    """The runtime's rule: a step of `tokens` verified tokens in rows × width runs packed (the scheduler
    prices steps by the same rule)."""
    return tokens <= PACK_BELOW * rows * width


@dataclass
class Packing:
    """Where the B packed tokens sit in the (rows, width) grid of a step: token b is row[b], column col[b]."""

    rows: int
    width: int
    row: torch.Tensor     # (B,) long
    col: torch.Tensor     # (B,) long

    def __post_init__(self):
        self.index = self.row * self.width + self.col   # (B,) position in the flattened (rows × width) grid

    @classmethod
    def of(cls, lengths: list[int], width: int, device) -> "Packing":
        """Row r packs its first lengths[r] columns."""
        row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
        col = torch.arange(int(sum(lengths))) - torch.repeat_interleave(starts, torch.tensor(lengths))
        return cls(len(lengths), width, row.to(device), col.to(device))

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, width, …) → (1, B, …)."""
        return grid.reshape(self.rows * self.width, *grid.shape[2:])[self.index][None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(1, B, …) → (rows, width, …), zeros where nothing was packed."""
        out = packed.new_zeros((self.rows * self.width, *packed.shape[2:]))
        out[self.index] = packed[0]
        return out.view(self.rows, self.width, *packed.shape[2:])


def additive_mask(past_valid: torch.Tensor, new_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, W, S + W) additive mask: column j of row r sees its row's valid past slots and its valid new
    slots up to j (eager attention's convention: 0 = attend, the dtype's minimum = masked)."""
    w = new_valid.shape[1]
    causal = torch.ones(w, w, dtype=torch.bool, device=new_valid.device).tril()
    sees = torch.cat([past_valid[:, None, :].expand(-1, w, -1), new_valid[:, None, :] & causal], -1)
    return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)[:, None]


def packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query (1, H, B, hd) of the packed tokens; key/value (R, KV, S, hd) the whole slot cache (this
    step's keys included); attention_mask from `additive_mask` → (1, B, H, hd)."""
    p: Packing = kwargs["dspark_packing"]
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")):
        raise ValueError("packed verification computes full causal attention only: this target's layers need "
                         "more (sliding window, softcapping or sinks); run it with packed=False")
    _, h, _, hd = query.shape
    q = query.new_zeros((p.rows * p.width, h, hd))
    q[p.index] = query[0].transpose(0, 1)
    q = q.view(p.rows, p.width, h, hd).transpose(1, 2)                         # (R, H, W, hd)
    out = grouped_attention(q, key, value, attention_mask, scaling, fp32=runs_kernel(module)).transpose(1, 2)
    out = out.reshape(p.rows * p.width, h, hd)
    return out[p.index][None], None


AttentionInterface.register(ATTENTION, packed_attention)


def packed_forward(target, ids: torch.Tensor, past_valid: torch.Tensor, new_valid: torch.Tensor, pos: torch.Tensor,
                   cache, layers: tuple[int, ...], packing: Packing):
    """The verification forward of a ragged step, packed: ids and pos (R, width) as the padded step would
    run them, `past_valid` (R, S) the cache's slots, `new_valid` (R, width) the rows' verified columns. Returns
    the Hugging Face output with `.logits` and the `.hidden_states` at `layers` (the others None; none at
    all when `layers` is empty) unpacked to (R, width, …), zeros where nothing was verified."""
    out = target.cached_forward(packing.pack(ids), additive_mask(past_valid, new_valid, target.dtype),
                                packing.pack(pos), cache, bool(layers), attention=ATTENTION, dspark_packing=packing)
    out.logits = packing.unpack(out.logits)
    if out.hidden_states is not None:
        out.hidden_states = tuple(packing.unpack(h) if i in layers else None for i, h in enumerate(out.hidden_states))
    return out
