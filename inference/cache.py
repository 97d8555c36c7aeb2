"""A KV cache for ragged batched verification on an unmodified Hugging Face model.

Layout: one rectangular cache of S *slots* shared by all R rows (requests). Every step appends
T = 1 + max_r ℓ_r slots to every row; a row's unused or rejected slots become *holes*, masked out
by a per-row validity mask that the runtime passes as the 2D attention mask. RoPE reads only
`position_ids`, so holes never shift positions.

Cost model: a step attends over S slots per row, so holes cost attention work in proportion to
their share. `compact()` gathers each row's valid slots to the right (left-padded) when the slots
every row could drop exceed a threshold (`SlotCache.removable`); it costs one gather per layer, so
the runtime does it only when at least ~20 % of S can go.

Storage is preallocated and grows by doubling, so appending T slots writes T slots instead of
re-concatenating the whole cache every step (what `DynamicLayer` does).

Continuous batching: requests that join a running batch are prefilled in a cache of their own and
`place`d into this one: into the rows of finished requests where possible (only the joiner's slots are
written, right-aligned; the finished request's slots become holes), else as new rows. Rows and slots
never need to line up: the mask and `position_ids` carry everything.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer's keys/values in a growable buffer; `keys`/`values` are views of the filled part."""

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        self.device = key_states.device
        self._k = key_states.new_empty(0)
        self._v = value_states.new_empty(0)
        self.length = 0
        self.keys, self.values = self._k, self._v
        self.is_initialized = True

    def _reserve(self, like: torch.Tensor, needed: int, rows: int | None = None) -> None:
        b, h, _, d = like.shape
        b = b if rows is None else rows
        if self.length and self._k.shape[0] == b and self._k.shape[2] >= needed:
            return
        cap = max(needed, 2 * (self._k.shape[2] if self._k.dim() == 4 else 0), 64)
        k = like.new_empty((b, h, cap, d))
        v = like.new_empty((b, h, cap, d))
        if self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states, value_states, *args, **kwargs):
        packing = (kwargs.get("kwargs") or {}).get("dspark_packing")
        if packing is not None:
            return self._update_packed(key_states, value_states, packing)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.length, key_states.shape[-2]
        self._reserve(key_states, n + t)
        self._k[:, :, n : n + t] = key_states
        self._v[:, :, n : n + t] = value_states
        self.length = n + t
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def _update_packed(self, key_states, value_states, p):
        """A packed step (inference/packed.py): key_states (1, KV, B, hd) of the B packed tokens; every
        row gets p.width new slots, zeros where it packed nothing (finite, masked)."""
        if not (self.is_initialized and self.length) or self._k.shape[0] != p.rows:
            raise ValueError(f"packed step over a cache of {self._k.shape[0] if self.is_initialized else 0} "
                             f"filled rows, not {p.rows}: prefill first")
        n = self.length
        self._reserve(key_states, n + p.width, rows=p.rows)
        for buf, new in ((self._k, key_states), (self._v, value_states)):
            buf[:, :, n:n + p.width] = 0
            buf[p.row, :, n + p.col] = new[0].transpose(0, 1)
        self.length = n + p.width
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def grow(self, rows: int, pad: int) -> None:
        """Extend to `rows` rows (the new ones all zeros) and prepend `pad` zero slots to every row,
        keeping the spare capacity. Zeros, not garbage: a masked slot must still hold finite numbers
        (eager attention adds the mask to q·k, and NaN + mask is NaN)."""
        b, h, cap, d = self._k.shape
        n = self.length
        k = self._k.new_empty((rows, h, cap + pad, d))
        v = self._v.new_empty((rows, h, cap + pad, d))
        for new, old in ((k, self._k), (v, self._v)):
            new[:b, :, :pad] = 0
            new[:b, :, pad:pad + n] = old[:, :, :n]
            new[b:, :, :pad + n] = 0
        self._k, self._v, self.length = k, v, n + pad
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Swap in new (B, H, S, D) contents (after a row selection or a compaction)."""
        self._k, self._v = keys.contiguous(), values.contiguous()
        self.length = keys.shape[2]
        self.keys, self.values = self._k, self._v


class SlotCache(Cache):
    """The shared KV cache plus the (R, S) boolean validity mask of its slots."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_SlotLayer)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    def append_valid(self, new_valid: torch.Tensor) -> None:
        """Record validity of the T slots the last forward appended (R, T)."""
        if self.valid.numel() == 0:
            self.valid = new_valid.clone()
        else:
            self.valid = torch.cat([self.valid, new_valid], dim=1)

    def set_valid_tail(self, tail_valid: torch.Tensor) -> None:
        """Overwrite the validity of the last T slots (rollback of rejected drafts)."""
        self.valid[:, -tail_valid.shape[1]:] = tail_valid

    def attention_mask(self, new_valid: torch.Tensor) -> torch.Tensor:
        """2D mask over all slots (past + the T about to be appended), as the model expects."""
        return torch.cat([self.valid, new_valid], dim=1).long()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished requests leave the batch)."""
        for layer in self.layers:
            if layer.is_initialized and layer.length:
                layer.replace(layer.keys[rows], layer.values[rows])
        self.valid = self.valid[rows]

    def place(self, src: "SlotCache", dst: list[int]) -> None:
        """Put the rows of `src` (a prefill of requests joining the batch) at rows `dst` of this cache:
        an index below the row count R overwrites that row (a finished request's), the others must be
        R, R+1, … and add rows. Each placed row holds src's slots right-aligned, its earlier slots
        become holes; if src is wider, every row first gets holes on the left. Writes only the placed
        rows' slots unless rows or slots must grow (then one copy of the cache)."""
        r, n = self.valid.shape[0], src.num_slots
        rows, pad = max(r, max(dst) + 1), max(n - self.num_slots, 0)
        if sorted(d for d in dst if d >= r) != list(range(r, rows)) or len(set(dst)) != len(dst):
            raise ValueError(f"place: rows {dst} neither overwrite existing rows nor add rows {r}, {r + 1}, …")
        filled = [layer for layer in self.layers if layer.is_initialized and layer.length == self.num_slots]
        if n and (not self.num_slots or len(filled) != len(src.layers)):
            raise ValueError("place: this cache has no filled layers to place rows into (run a forward first)")
        if rows > r or pad:
            for layer in filled:
                layer.grow(rows, pad)
            valid = torch.zeros(rows, self.num_slots + pad, dtype=torch.bool, device=self.valid.device)
            valid[:r, pad:] = self.valid
            self.valid = valid
        s = self.num_slots
        idx = torch.tensor(dst, device=self.valid.device)
        self.valid[idx] = False
        if n:
            self.valid[idx, s - n:] = src.valid.to(self.valid.device)
            for mine, theirs in zip(filled, src.layers):
                at = idx.to(mine._k.device)
                mine._k[at, :, s - n:s] = theirs.keys
                mine._v[at, :, s - n:s] = theirs.values

    @property
    def removable(self) -> int:
        """Slots that every row could drop (the widest row's holes)."""
        if self.valid.numel() == 0:
            return 0
        return self.num_slots - int(self.valid.sum(dim=1).max())

    def compact(self) -> None:
        """Move each row's valid slots to the right end, preserving order; drop common holes."""
        s = self.num_slots
        width = s - self.removable
        # A stable sort of 0/1 validity puts holes first and keeps valid slots in order.
        flags, order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True)
        idx = order[:, s - width:]                                        # (R, S')
        for layer in self.layers:
            if not (layer.is_initialized and layer.length):
                continue
            r, h, _, d = layer.keys.shape
            gather = idx[:, None, :, None].expand(r, h, width, d).to(layer.keys.device)
            layer.replace(layer.keys.gather(2, gather), layer.values.gather(2, gather))
        self.valid = flags[:, s - width:].bool()

    def truncate(self, n: int) -> None:
        """Drop the last n slots of every row (slots every row rejected; the step-cost profiler)."""
        for layer in self.layers:
            if layer.is_initialized and layer.length:
                layer.length -= n
                layer.keys, layer.values = layer._k[:, :, : layer.length], layer._v[:, :, : layer.length]
        self.valid = self.valid[:, :-n]
