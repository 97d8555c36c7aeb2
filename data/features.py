"""The target-feature store on disk: the frozen target's hidden states for every row of a dataset, so
training skips the target forward without holding the features in RAM.

A store is a folder (`features_dir`, or `<output_dir>/features` of `dspark generate cache_features=true`):

- `store.json`: format, version, target name, layer ids, hidden size, dtype and row width (k + 1)·H.
- `shard-<rank>-<n>.safetensors`: standard safetensors files, two tensors each: `features`
  (n_tokens, (k+1)·H) in the store's dtype (bf16 by default), every token's hidden states at the k
  layers concatenated, then its final, normed hidden state (the frozen LM head turns it back into the
  target's logits, so logits are never stored), and `input_ids` (n_tokens,) int32, the tokens the
  rows were computed from. The header's metadata holds the shard's index: one [prompt_id, offset,
  length] per row. A shard and its index are one file, written to a temporary name and renamed: a
  shard either is complete or is not there, and a build interrupted at any point (even kill -9)
  resumes with the rows no finished shard holds.

Features are computed in batched passes: rows sorted by (length, prompt_id), `batch_size` rows per
forward, right-padded (as `FeatureSource.precompute` does), whole batches grouped into shards of at
least `shard_tokens` tokens. Under N processes rank r computes rows r, r+N, … of that order into its own
`shard-<r>-…` files (no two ranks write one file; no waiting on each other while building). Reading
memory-maps each shard (`np.memmap`) and copies out only the rows of a batch. Disk: (k+1)·H·2 + 4 bytes
per token in bf16, 6.9 KB for SmolLM2-135M with k = 5 (H = 576).
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dspark.core.errors import DSparkError
from dspark.core.files import folder_lock, write_json_atomic
from dspark.models.dspark import default_layer_ids

FORMAT, VERSION = "dspark-feature-store", 1
SHARD_TOKENS = 1 << 16   # tokens per shard (≈450 MB for SmolLM2 at k = 5): what a resumed build recomputes at most
BUILD_BATCH = 8          # rows per forward when `dspark generate cache_features=true` builds the store
STORE_DTYPES = {"bfloat16": (torch.bfloat16, "BF16", np.int16), "float32": (torch.float32, "F32", np.float32)}
SHARD = re.compile(r"shard-(\d+)-(\d+)\.safetensors")


def check_layers(target, layers) -> list[int]:
    """The validated layer ids; None means the draft heads' default (`default_layer_ids`)."""
    if layers is None:
        return default_layer_ids(target.num_layers)
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i <= target.num_layers]
    if bad or not layers:
        raise DSparkError(f"feature_layers {bad or layers} out of range for target '{target.name}' with "
                          f"{target.num_layers} layers: use indices 0..{target.num_layers}")
    return layers


def length_order(rows: list[dict]) -> list[dict]:
    """Rows by (length, prompt_id), each prompt once: the order of every batched feature pass."""
    seen = {}
    for r in rows:
        seen.setdefault(r["prompt_id"], r)
    return sorted(seen.values(), key=lambda r: (len(r["input_ids"]), r["prompt_id"]))


def padded(rows: list[dict]) -> torch.Tensor:
    """Right-padded (B, L) token ids (Target.features says why padding needs no mask)."""
    ids = torch.zeros(len(rows), max(len(r["input_ids"]) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
    return ids


def cache_features(target, layers, chunks: Path, out: Path, rank: int = 0, world: int = 1) -> None:
    """`dspark generate cache_features=true`: the store in `out` for every row of the chunk files (bf16)."""
    layers = check_layers(target, layers)
    rows = [json.loads(line) for f in sorted(Path(chunks).glob("chunk-*.jsonl"))
            for line in f.read_text().splitlines() if line]
    FeatureStore(out, target.name, layers, target.hidden_size, "bfloat16", create=True).build(
        target, rows, BUILD_BATCH, rank, world)


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the byte offset where its data starts."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


class FeatureStore:
    """One store folder: identity checks, the index over its finished shards, building and reading."""

    def __init__(self, folder, target_name: str, layers: list[int], hidden_size: int, dtype: str = "bfloat16",
                 create: bool = False):
        """Opens `folder` (makes it, with its store.json, when `create`); one DSparkError when it is a store
        for another target, other layers or another dtype."""
        self.folder = Path(folder)
        self.ident = {"format": FORMAT, "version": VERSION, "target": target_name, "layers": [int(i) for i in layers],
                      "hidden_size": int(hidden_size), "dtype": dtype,
                      "row_width": (len(layers) + 1) * int(hidden_size)}
        self.width, self.split = self.ident["row_width"], len(layers) * int(hidden_size)
        self.torch_dtype, self.st_dtype, self.np_dtype = STORE_DTYPES[dtype]
        meta = self.folder / "store.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise DSparkError(f"features_dir '{self.folder}' is a file: pass features_dir=<folder>")
        if meta.is_file():
            try:
                have = json.loads(meta.read_text())
            except ValueError:
                have = {"format": "unreadable store.json"}
            self._check(have)
        elif create:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(meta, self.ident)
        self.index: dict[str, tuple[str, int, int]] = {}   # prompt_id -> (shard file name, offset, length)
        self.maps: dict[str, tuple[np.memmap, np.memmap]] = {}
        self.refresh()

    def _check(self, have: dict) -> None:
        def show(d):
            return (f"layers {d.get('layers')} of target '{d.get('target')}' (hidden size {d.get('hidden_size')}, "
                    f"{d.get('dtype')}, {d.get('format')} v{d.get('version')})")

        if have != self.ident:
            raise DSparkError(f"feature store {self.folder} holds {show(have)}, but this run needs {show(self.ident)}: "
                              f"point features_dir= at another folder, or delete {self.folder} yourself if it is "
                              "no longer needed (dspark never deletes it)")

    @property
    def exists(self) -> bool:
        return (self.folder / "store.json").is_file()

    def shard_files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("shard-*.safetensors") if SHARD.fullmatch(p.name)) \
            if self.folder.is_dir() else []

    def refresh(self) -> None:
        """(Re)read the index of every finished shard; a row in two shards keeps its longest entry."""
        self.index, self.maps = {}, {}
        for f in self.shard_files():
            header, _ = read_header(f)
            meta = header.get("__metadata__", {})
            self._check(json.loads(meta.get("store", "{}")))   # a shard copied in from another store
            for pid, off, n in json.loads(meta["rows"]):
                if pid not in self.index or self.index[pid][2] < n:
                    self.index[pid] = (f.name, off, n)

    def _maps(self, name: str) -> tuple[np.memmap, np.memmap]:
        if name not in self.maps:
            f = self.folder / name
            header, start = read_header(f)
            feats, ids = header["features"], header["input_ids"]
            self.maps[name] = (
                np.memmap(f, dtype=self.np_dtype, mode="r", offset=start + feats["data_offsets"][0],
                          shape=tuple(feats["shape"])),
                np.memmap(f, dtype=np.int32, mode="r", offset=start + ids["data_offsets"][0],
                          shape=tuple(ids["shape"])))
        return self.maps[name]

    def missing(self, rows: list[dict]) -> list[dict]:
        """The rows the store cannot serve: not in a shard, or stored shorter than the row. A row stored
        with other tokens is an error (a store made from another dataset)."""
        out, stale = [], []
        for r in rows:
            entry = self.index.get(r["prompt_id"])
            n = len(r["input_ids"])
            if entry is None or entry[2] < n:
                out.append(r)
            elif not np.array_equal(self._maps(entry[0])[1][entry[1]:entry[1] + n], r["input_ids"]):
                stale.append(r["prompt_id"])
        if stale:
            raise DSparkError(f"feature store {self.folder} holds features of other tokens for {len(stale)} rows "
                              f"(e.g. prompt {stale[0]}): it was made from another dataset; point features_dir= at "
                              f"another folder, or delete {self.folder} yourself")
        return out

    def get(self, pid: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens of one row (at most its stored length): (n, k·H) layer features and (n, H) final
        states, copied out of the map."""
        name, off, length = self.index[pid]
        n = min(n, length)
        block = torch.from_numpy(np.array(self._maps(name)[0][off:off + n]))
        if self.torch_dtype == torch.bfloat16:
            block = block.view(torch.bfloat16)
        return block[:, :self.split], block[:, self.split:]

    def batch(self, pids: list[str], lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A right-padded batch (B, width, k·H) and (B, width, H), zeros after each row's length: one copy
        from the maps into the batch tensor."""
        out = torch.zeros(len(pids), width, self.width, dtype=self.torch_dtype)
        dest = out.view(torch.int16).numpy() if self.torch_dtype == torch.bfloat16 else out.numpy()
        for i, (pid, n) in enumerate(zip(pids, lengths)):
            name, off, length = self.index[pid]
            n = min(n, length, width)
            dest[i, :n] = self._maps(name)[0][off:off + n]
        return out[..., :self.split], out[..., self.split:]

    # ------------------------------------------------------------------ building
    def plan(self, rows: list[dict], batch_size: int, rank: int, world: int, shard_tokens: int) -> list[list[list]]:
        """This rank's shards still to compute: its share of the global length order, minus the rows the
        store already serves, in batches of `batch_size` rows, whole batches grouped into shards."""
        todo = {r["prompt_id"] for r in self.missing(rows)}
        mine = [r for r in length_order(rows)[rank::world] if r["prompt_id"] in todo]
        shards, cur, size = [], [], 0
        for i in range(0, len(mine), batch_size):
            batch = mine[i:i + batch_size]
            cur.append(batch)
            size += sum(len(r["input_ids"]) for r in batch)
            if size >= shard_tokens:
                shards.append(cur)
                cur, size = [], 0
        return shards + ([cur] if cur else [])

    @torch.no_grad()
    def build(self, target, rows: list[dict], batch_size: int, rank: int = 0, world: int = 1,
              shard_tokens: int = SHARD_TOKENS, bar: bool = True) -> int:
        """Compute this rank's missing rows into new shards; returns the tokens computed. Other ranks build
        their own shares at the same time; call `refresh` after all of them are done."""
        if not self.exists:
            raise DSparkError(f"no feature store in {self.folder}: open it with create=True")
        shards = self.plan(rows, batch_size, rank, world, shard_tokens)
        if not shards:
            return 0
        done = 0
        with folder_lock(self.folder, f"features-rank{rank}", "feature store build"):
            for stale in self.folder.glob(f".shard-{rank:03d}-*.tmp"):   # left by a killed build of this rank
                stale.unlink()
            used = [int(m.group(2)) for p in self.shard_files()
                    if (m := SHARD.fullmatch(p.name)) and int(m.group(1)) == rank]
            first = max(used, default=-1) + 1
            total = sum(len(r["input_ids"]) for s in shards for b in s for r in b)
            with tqdm(total=total, desc=f"feature store (rank {rank})", unit="tok", disable=not bar) as pbar:
                for k, shard in enumerate(shards):
                    done += self._write_shard(target, shard, f"shard-{rank:03d}-{first + k:05d}", pbar)
        self.refresh()
        return done

    def _write_shard(self, target, batches: list[list[dict]], name: str, pbar) -> int:
        rows = [r for b in batches for r in b]
        lengths = [len(r["input_ids"]) for r in rows]
        n = sum(lengths)
        fbytes = n * self.width * self.torch_dtype.itemsize
        offsets = np.cumsum([0] + lengths[:-1]).tolist()
        index = [[r["prompt_id"], o, m] for r, o, m in zip(rows, offsets, lengths)]
        header = {"features": {"dtype": self.st_dtype, "shape": [n, self.width], "data_offsets": [0, fbytes]},
                  "input_ids": {"dtype": "I32", "shape": [n], "data_offsets": [fbytes, fbytes + 4 * n]},
                  "__metadata__": {"store": json.dumps(self.ident), "rows": json.dumps(index)}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(struct.pack("<Q", len(raw)) + raw)
                for batch in batches:
                    layers, last = target.features(padded(batch).to(target.device), self.ident["layers"])
                    full = torch.cat([layers, last], -1).to(self.torch_dtype).cpu()
                    for j, r in enumerate(batch):
                        fh.write(full[j, :len(r["input_ids"])].contiguous().view(torch.uint8).numpy().tobytes())
                    pbar.update(sum(len(r["input_ids"]) for r in batch))
                fh.write(np.concatenate([np.asarray(r["input_ids"], dtype="<i4") for r in rows]).tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / f"{name}.safetensors")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.shard_files())
