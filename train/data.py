"""Training data: the self-distilled dataset from `dspark generate`, split, batched, with target features.

Rows hold `input_ids` (prompt + the target's own response) and `loss_mask` (1 on response tokens).
A validation split is taken by a hash of `prompt_id` (deterministic, disjoint from training).
Target features (`features` setting, `FeatureSource.prepare`): `store` reads the on-disk feature store
in `features_dir` (data/features.py), building what it lacks first; `memory` keeps them in RAM in the
target's dtype after one batched pass; `online` runs the frozen target every step; `cache` reads only
what `dspark generate cache_features=true` made (a store, or the per-chunk cache of older versions).
`auto`: generate's features when they cover the dataset, else memory when it fits `features_memory_gb`,
else the store (online only without a features_dir).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dspark.core.errors import DSparkError
from dspark.data.features import FeatureStore, length_order, padded


def draft_vocabulary(rows: list[dict], size: int, vocab_size: int) -> torch.Tensor | None:
    """The (at most) `size` most frequent response tokens, ids sorted; None for the full vocabulary."""
    if not size or size >= vocab_size:
        return None
    counts = Counter()
    for r in rows:
        counts.update(t for t, m in zip(r["input_ids"], r["loss_mask"]) if m)
    return torch.tensor(sorted(t for t, _ in counts.most_common(size)))


def collate(rows: list[dict]) -> dict:
    ids = padded(rows)
    mask = torch.zeros_like(ids)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        mask[i, :n] = torch.tensor(r["loss_mask"])
        valid[i, :n] = True
    return {"input_ids": ids, "loss_mask": mask, "valid": valid, "prompt_id": [r["prompt_id"] for r in rows]}


def sample_anchors(loss_mask: torch.Tensor, count: int, gamma: int, gen: torch.Generator | None):
    """Anchor positions n whose next token is a response token; (B, A) positions, (B, A, γ) validity of
    each predicted position n+k (inside the row and a response token). `gen` None: every such position,
    in order (A = the most any row has)."""
    b, width = loss_mask.shape
    cands = [(loss_mask[i, 1:] > 0).nonzero()[:, 0] for i in range(b)]
    if gen is None:
        count = max(len(c) for c in cands)
    anchors = torch.zeros(b, count, dtype=torch.long)
    ok = torch.zeros(b, count, dtype=torch.bool)
    for i, cand in enumerate(cands):
        pick = cand if gen is None else cand[torch.randperm(len(cand), generator=gen)[:count]].sort().values
        anchors[i, :len(pick)], ok[i, :len(pick)] = pick, True
    pos = anchors[:, :, None] + torch.arange(1, gamma + 1)
    inside = pos < width
    tok_ok = loss_mask.gather(1, pos.clamp_max(width - 1).view(b, -1)).view(b, count, gamma) > 0
    return anchors, ok[:, :, None] & inside & tok_ok


def cache_files(cache_dir: str | None, required: bool = False) -> list[Path]:
    """The chunk files of the per-chunk cache older `dspark generate cache_features=true` wrote in
    `cache_dir`; with `required` (features=cache) having neither those nor a feature store is an error."""
    folder = Path(cache_dir) if cache_dir else None
    files = sorted(folder.glob("chunk-*.safetensors")) if folder and folder.is_dir() else []
    if required and not files and not (folder and (folder / "store.json").is_file()):
        raise DSparkError(f"features=cache but no feature cache in features_dir={cache_dir}: run `dspark generate "
                          "cache_features=true` into this output_dir first (or point features_dir= at its features "
                          "folder), or use features=auto")
    return files


def check_store_dir(features_dir: str | None) -> None:
    """features=store needs a features_dir that is (or can become) a folder: checked before any work."""
    p = Path(str(features_dir)).expanduser() if features_dir else None
    if p is None or (p.exists() and not p.is_dir()):
        raise DSparkError(f"features=store needs features_dir=<folder> (got {features_dir}): pass a folder for "
                          "the feature store, or use features=memory|online")


class FeatureSource:
    """Target hidden states for a batch: `layers` (B, L, k·H) and `last` (B, L, H, final-normed)."""

    def __init__(self, target, layer_ids: list[int], cache_dir: str | None, use_cache: str = "auto",
                 store_dtype: str = "bfloat16"):
        """`use_cache` is the `features` setting: auto | memory | online | cache | store; `store_dtype` the
        dtype a store is built in (`features_dtype`)."""
        self.target, self.layer_ids, self.use = target, list(layer_ids), use_cache
        self.dir, self.store_dtype = cache_dir, store_dtype
        self.files: dict[str, Path] = {}
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.store: FeatureStore | None = None
        if use_cache not in ("auto", "cache"):
            return
        for f in cache_files(cache_dir, required=False):   # the per-chunk cache of older versions
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
        return "cache" if self.files else "store" if self.store else "memory" if self.memory else "online"

    def bytes_per_token(self) -> int:
        return (len(self.layer_ids) + 1) * self.target.hidden_size * self.target.dtype.itemsize

    def open_store(self, create: bool = False) -> FeatureStore:
        return FeatureStore(self.dir, self.target.name, self.layer_ids, self.target.hidden_size, self.store_dtype,
                            create=create)

    def prepare(self, rows: list[dict], memory_gb: float, batch_size: int, rank: int = 0, world: int = 1,
                barrier=lambda: None, bar: bool = True) -> None:
        """Choose where features come from for `rows` (see the module doc) and compute what that needs.
        Under N processes every rank builds its share of a store, then `barrier` (all ranks) and every
        rank reads the whole store."""
        use = self.use
        if use == "online" or (self.files and use == "auto"):
            return
        if self.files:   # features=cache from an old per-chunk cache
            missing = sum(r["prompt_id"] not in self.files for r in rows)
            if missing:
                raise DSparkError(f"features=cache but the feature cache in {self.dir} lacks {missing} of the "
                                  f"dataset's {len(rows)} rows: regenerate it (dspark generate cache_features=true) "
                                  "or use features=auto")
            return
        if use in ("auto", "cache") and self.dir and (Path(self.dir) / "store.json").is_file():
            try:
                store = self.open_store()
                missing = len(store.missing(rows))
            except DSparkError:
                if use == "cache":
                    raise
                store, missing = None, -1   # auto: another store there; decided below (memory, or refused)
            if missing == 0:
                self.store = store
                return
            if use == "cache":
                raise DSparkError(f"features=cache but the feature store in {self.dir} lacks {missing} of the "
                                  f"dataset's {len(rows)} rows: use features=store (computes them) or features=auto")
        need = sum(len(r["input_ids"]) for r in rows) * self.bytes_per_token() / 2**30
        if use == "memory" or (use == "auto" and (need <= memory_gb or not self.dir)):
            if need > memory_gb and use == "memory":
                raise DSparkError(f"features=memory needs {need:.1f} GB > features_memory_gb={memory_gb}: "
                                  "raise the limit, use features=store (features on disk) or features=online")
            if need <= memory_gb:
                self.precompute(rows, batch_size, disable_bar=not bar)
            return
        store = self.open_store(create=True)
        barrier()   # every rank has decided before any rank writes a shard
        t0 = time.perf_counter()
        made = store.build(self.target, rows, batch_size, rank, world, bar=bar)
        seconds = time.perf_counter() - t0
        barrier()
        store.refresh()
        missing = len(store.missing(rows))
        if missing:   # another job removed shards meanwhile: never train on a partial store
            raise DSparkError(f"feature store {self.dir} still lacks {missing} rows after building: rerun")
        self.store = store
        if bar:
            tokens = sum(n for _, _, n in store.index.values())
            tqdm.write(f"feature store {self.dir}: {made} tokens computed in {seconds:.1f} s "
                       f"({made / max(seconds, 1e-9):.0f} tok/s, rank {rank}); {store.disk_bytes() / 2**30:.2f} GB on "
                       f"disk for {tokens} tokens ({store.disk_bytes() / max(tokens, 1):.0f} bytes/token)")

    @torch.no_grad()
    def precompute(self, rows: list[dict], batch_size: int, disable_bar: bool = False) -> None:
        """One batched target pass over every row, kept in RAM: each later epoch then costs only
        the draft's own work (kept in the target's dtype). Rows sorted by length so batches carry little
        padding (the store's order, so both see the same batches)."""
        order, t0 = length_order(rows), time.perf_counter()
        for i in tqdm(range(0, len(order), batch_size), desc="target features", unit="batch", disable=disable_bar):
            chunk = order[i:i + batch_size]
            layers, last = self._online(collate(chunk))
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                self.memory[r["prompt_id"]] = (layers[j, :n].cpu(), last[j, :n].cpu())
        if not disable_bar:
            tokens, seconds = sum(len(r["input_ids"]) for r in order), time.perf_counter() - t0
            tqdm.write(f"target features in RAM: {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} "
                       f"tok/s); {tokens * self.bytes_per_token() / 2**30:.2f} GB")

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory and all(p in self.memory for p in batch["prompt_id"]):
            return self._stack(batch, [self.memory[p] for p in batch["prompt_id"]])
        if self.store and all(p in self.store.index for p in batch["prompt_id"]):
            layers, last = self.store.batch(batch["prompt_id"], batch["valid"].sum(1).tolist(),
                                            batch["input_ids"].shape[1])
            return layers.to(self.target.device), last.to(self.target.device)
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
