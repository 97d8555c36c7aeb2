"""Training data: the self-distilled dataset from `dspark generate`, split, batched, with target features.

Rows hold `input_ids` (prompt + the target's own response) and `loss_mask` (1 on response tokens).
A validation split is taken by a hash of `prompt_id` (deterministic, disjoint from training).
Target features come from the optional bf16 cache of `dspark generate cache_features=true` when its
layers match the head's; otherwise one batched pass of the frozen target at start-up keeps them in RAM
in the target's dtype (`memory`, when they fit `features_memory_gb`), else the target runs online every step.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from dspark.core.errors import DSparkError


def draft_vocabulary(rows: list[dict], size: int, vocab_size: int) -> torch.Tensor | None:
    """The (at most) `size` most frequent response tokens, ids sorted; None for the full vocabulary."""
    if not size or size >= vocab_size:
        return None
    counts = Counter()
    for r in rows:
        counts.update(t for t, m in zip(r["input_ids"], r["loss_mask"]) if m)
    return torch.tensor(sorted(t for t, _ in counts.most_common(size)))


def collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = torch.tensor(r["loss_mask"])
        valid[i, :n] = True
    return {"input_ids": ids, "loss_mask": mask, "valid": valid, "prompt_id": [r["prompt_id"] for r in rows]}


def sample_anchors(loss_mask: torch.Tensor, count: int, gamma: int, gen: torch.Generator | None):
    """Anchor positions n whose next token is a response token; (B, A) positions, (B, A, γ) validity of
    each predicted position n+k (inside the row and a response token)."""
    b, width = loss_mask.shape
    anchors = torch.zeros(b, count, dtype=torch.long)
    ok = torch.zeros(b, count, dtype=torch.bool)
    for i in range(b):
        cand = (loss_mask[i, 1:] > 0).nonzero()[:, 0]
        pick = cand[torch.randperm(len(cand), generator=gen)[:count]].sort().values
        anchors[i, :len(pick)], ok[i, :len(pick)] = pick, True
    pos = anchors[:, :, None] + torch.arange(1, gamma + 1)
    inside = pos < width
    tok_ok = loss_mask.gather(1, pos.clamp_max(width - 1).view(b, -1)).view(b, count, gamma) > 0
    return anchors, ok[:, :, None] & inside & tok_ok


def cache_files(cache_dir: str | None, required: bool = False) -> list[Path]:
    """The chunk files of `dspark generate cache_features=true` in `cache_dir`; none is an error when
    `required` (features=cache)."""
    folder = Path(cache_dir) if cache_dir else None
    files = sorted(folder.glob("chunk-*.safetensors")) if folder and folder.is_dir() else []
    if required and not files:
        raise DSparkError(f"features=cache but no feature cache in features_dir={cache_dir}: run `dspark generate "
                          "cache_features=true` into this output_dir first (or point features_dir= at its features "
                          "folder), or use features=auto")
    return files


class FeatureSource:
    """Target hidden states for a batch: `layers` (B, L, k·H) and `last` (B, L, H, final-normed)."""

    def __init__(self, target, layer_ids: list[int], cache_dir: str | None, use_cache: str = "auto"):
        """`use_cache` is the `features` setting: auto | memory | online | cache (cache: it must be there)."""
        self.target, self.layer_ids = target, list(layer_ids)
        self.files: dict[str, Path] = {}
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if use_cache in ("online", "memory"):
            return
        for f in cache_files(cache_dir, required=use_cache == "cache"):
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                if json.loads(meta.get("layers", "[]")) != self.layer_ids or meta.get("target") != target.name:
                    if use_cache == "cache":
                        raise DSparkError(f"feature cache {f} holds layers {meta.get('layers')} of target "
                                          f"{meta.get('target')}, the head needs {self.layer_ids} of {target.name}: "
                                          "regenerate with matching feature_layers or set features=online")
                    self.files = {}
                    return
                for key in fh.keys():
                    self.files[key.rsplit(".", 1)[0]] = f

    @property
    def mode(self) -> str:
        return "cache" if self.files else "memory" if self.memory else "online"

    def bytes_per_token(self) -> int:
        return (len(self.layer_ids) + 1) * self.target.hidden_size * self.target.dtype.itemsize

    @torch.no_grad()
    def precompute(self, rows: list[dict], batch_size: int, disable_bar: bool = False) -> None:
        """One batched target pass over every row, kept in RAM: each later epoch then costs only
        the draft's own work (kept in the target's dtype). Rows sorted by length so batches carry little padding."""
        from tqdm import tqdm

        order = sorted(rows, key=lambda r: len(r["input_ids"]))
        for i in tqdm(range(0, len(order), batch_size), desc="target features", unit="batch", disable=disable_bar):
            chunk = order[i:i + batch_size]
            layers, last = self._online(collate(chunk))
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                self.memory[r["prompt_id"]] = (layers[j, :n].cpu(), last[j, :n].cpu())

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory and all(p in self.memory for p in batch["prompt_id"]):
            return self._stack(batch, [self.memory[p] for p in batch["prompt_id"]])
        if self.files and all(p in self.files for p in batch["prompt_id"]):
            return self._cached(batch)
        return self._online(batch)

    def _online(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # right-padded rows, no attention mask: Target.features says why
        return self.target.features(batch["input_ids"].to(self.target.device), self.layer_ids)

    def _cached(self, batch):
        pairs = []
        for pid in batch["prompt_id"]:
            with safe_open(str(self.files[pid]), "pt") as fh:
                pairs.append((fh.get_tensor(f"{pid}.layers"), fh.get_tensor(f"{pid}.last")))
        return self._stack(batch, pairs)

    def _stack(self, batch, pairs):
        b, width = batch["input_ids"].shape
        layers = torch.zeros(b, width, pairs[0][0].shape[-1], dtype=pairs[0][0].dtype)
        last = torch.zeros(b, width, pairs[0][1].shape[-1], dtype=pairs[0][1].dtype)
        for i, (lay, la) in enumerate(pairs):
            n = min(len(lay), width)
            layers[i, :n], last[i, :n] = lay[:n], la[:n]
        return layers.to(self.target.device), last.to(self.target.device)
