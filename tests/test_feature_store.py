"""The target-feature store (data/features.py): its values are the target's features, an interrupted build
resumes to the same files, training from it equals training from RAM, a store for other layers or another
target is refused, and reading maps the shards instead of loading them."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import compose_cfg
from dspark.settings import check
from dspark.core.errors import DSparkError
from dspark.data.dataset import load_rows
from dspark.data.features import FeatureStore, cache_features
from dspark.models.dspark import default_layer_ids
from dspark.train.data import FeatureSource
from dspark.train.trainer import run as train

FAST = ["target=tiny", "draft=tiny", "logger=none", "batch_size=2", "anchors_per_seq=8", "val_anchors_per_seq=8",
        "max_seq_len=96", "max_steps=4", "eval_every=2", "save_every=0"]


@pytest.fixture(scope="module")
def rows(data_dir, tiny_target):
    return load_rows(data_dir, 96, tiny_target.vocab_size)


def store_for(folder, target, layers=None, dtype="bfloat16", name=None):
    return FeatureStore(folder, name or target.name, layers or default_layer_ids(target.num_layers),
                        target.hidden_size, dtype, create=True)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_store_values_are_the_targets_features(tmp_path, tiny_target, rows):
    layers = default_layer_ids(tiny_target.num_layers)
    store = store_for(tmp_path / "bf16", tiny_target)
    assert store.build(tiny_target, rows, 3, shard_tokens=200, bar=False) == sum(len(r["input_ids"]) for r in rows)
    assert len(store.shard_files()) >= 3 and not store.missing(rows)
    for r in rows:   # against a forward of the row alone: bf16 rounding only
        feats, last = tiny_target.features(torch.tensor([r["input_ids"]]), layers)
        a, b = store.get(r["prompt_id"], len(r["input_ids"]))
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), feats[0], atol=1e-2, rtol=2 ** -7)
        torch.testing.assert_close(b.float(), last[0], atol=1e-2, rtol=2 ** -7)
    exact = store_for(tmp_path / "fp32", tiny_target, dtype="float32")   # the same batches as the RAM pass: bit-equal
    exact.build(tiny_target, rows, 3, shard_tokens=200, bar=False)
    mem = FeatureSource(tiny_target, layers, None, "memory")
    mem.precompute(rows, 3, disable_bar=True)
    for r in rows:
        got, want = exact.get(r["prompt_id"], len(r["input_ids"])), mem.memory[r["prompt_id"]]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class Interrupted(Exception):
    pass


class DiesAfter:
    """The tiny target, whose `features` raises after `calls` forwards (an interrupted build)."""

    def __init__(self, target, calls):
        self.target, self.left = target, calls
        self.device = target.device

    def features(self, ids, layers):
        self.left -= 1
        if self.left < 0:
            raise Interrupted
        return self.target.features(ids, layers)


def test_an_interrupted_build_resumes_to_the_same_files(tmp_path, tiny_target, rows):
    store_for(tmp_path / "whole", tiny_target).build(tiny_target, rows, 2, shard_tokens=200, bar=False)
    cut = store_for(tmp_path / "cut", tiny_target)
    with pytest.raises(Interrupted):
        cut.build(DiesAfter(tiny_target, 3), rows, 2, shard_tokens=200, bar=False)
    done = cut.shard_files()
    assert 1 <= len(done) < len(store_for(tmp_path / "whole", tiny_target).shard_files())
    (tmp_path / "cut" / f".shard-000-{len(done):05d}.tmp").write_bytes(b"half a shard, as kill -9 leaves it")
    reread = store_for(tmp_path / "cut", tiny_target)
    assert 0 < len(reread.missing(rows)) < len(rows)   # a reader sees only finished shards
    reread.build(tiny_target, rows, 2, shard_tokens=200, bar=False)
    assert files(tmp_path / "cut") == files(tmp_path / "whole")   # byte for byte, no temporary left
    assert reread.build(tiny_target, rows, 2, shard_tokens=200, bar=False) == 0   # nothing to do


def test_ranks_build_their_own_shares(tmp_path, tiny_target, rows):
    """Under N processes rank r computes rows r, r+N, … of the length order into its own files (run here one
    rank after the other); together they serve every row, with the values of a 1-process build."""
    one = store_for(tmp_path / "one", tiny_target)
    one.build(tiny_target, rows, 2, bar=False)
    two = store_for(tmp_path / "two", tiny_target)
    made = [two.build(tiny_target, rows, 2, rank, 2, bar=False) for rank in (0, 1)]
    assert all(made) and sum(made) == sum(len(r["input_ids"]) for r in rows)
    assert {p.name[:9] for p in two.shard_files()} == {"shard-000", "shard-001"} and not two.missing(rows)
    for r in rows:
        for a, b in zip(one.get(r["prompt_id"], 10**6), two.get(r["prompt_id"], 10**6)):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=2 ** -7)


def curve(out):
    return [x for p in json.loads((out / "train.json").read_text())["curve"] for x in (p["train_loss"], p["val_loss"])]


def test_training_from_the_store_equals_training_from_memory(data_dir, tmp_path):
    common = [*FAST, f"data_dir={data_dir}"]
    train(compose_cfg("train", *common, f"output_dir={tmp_path / 'mem'}", "features=memory"))
    train(compose_cfg("train", *common, f"output_dir={tmp_path / 'fp32'}", "features=store", "features_dtype=float32"))
    feats = tmp_path / "fp32" / "features"
    assert json.loads((tmp_path / "fp32" / "train.json").read_text())["features"] == "store"
    assert json.loads((feats / "store.json").read_text())["dtype"] == "float32"
    assert curve(tmp_path / "fp32") == pytest.approx(curve(tmp_path / "mem"), rel=1e-6)   # same values, same batches
    # bf16 on disk, the tiny target in fp32: equal to bf16 rounding of the features
    shared = tmp_path / "bf16-features"
    train(compose_cfg("train", *common, f"output_dir={tmp_path / 'bf16'}", "features=store", f"features_dir={shared}"))
    assert curve(tmp_path / "bf16") == pytest.approx(curve(tmp_path / "mem"), rel=1e-3)   # measured 2e-5
    # auto over the RAM limit reads the store it finds (nothing rebuilt) and trains the same
    before = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    train(compose_cfg("train", *common, f"output_dir={tmp_path / 'auto'}", "features=auto", "features_memory_gb=0",
                      f"features_dir={shared}"))
    assert json.loads((tmp_path / "auto" / "train.json").read_text())["features"] == "store"
    assert {p.name: p.stat().st_mtime_ns for p in shared.iterdir()} == before
    assert curve(tmp_path / "auto") == curve(tmp_path / "bf16")


def test_generate_cache_features_makes_a_store_training_reads(data_dir, tmp_path, tiny_target, rows):
    """The store of `dspark generate cache_features=true` (same `cache_features` call): features=cache and
    features=auto both train from it without a target pass over the data."""
    chunks = Path(data_dir).parent / "chunks"
    cache_features(tiny_target, None, chunks, tmp_path / "features")
    store = store_for(tmp_path / "features", tiny_target)
    assert not store.missing(rows) and store.disk_bytes() > 0
    src = FeatureSource(tiny_target, default_layer_ids(tiny_target.num_layers), str(tmp_path / "features"), "cache")
    src.prepare(rows, 0.0, 4)
    assert src.mode == "store" and not src.memory
    auto = FeatureSource(tiny_target, default_layer_ids(tiny_target.num_layers), str(tmp_path / "features"), "auto")
    auto.prepare(rows, 100.0, 4)   # fits in RAM, but generate's store covers the data: no target pass
    assert auto.mode == "store"


def test_a_store_for_other_layers_target_or_dtype_is_refused(data_dir, tmp_path, tiny_target, rows):
    folder = tmp_path / "features"
    store_for(folder, tiny_target, layers=[1, 3]).build(tiny_target, rows[:3], 2, bar=False)
    before = files(folder)
    with pytest.raises(DSparkError, match=r"layers \[1, 3\] of target 'tiny'.*layers \[1, 2, 3\].*features_dir=") as e:
        store_for(folder, tiny_target, layers=[1, 2, 3])
    assert f"delete {folder} yourself" in str(e.value)
    with pytest.raises(DSparkError, match="target 'tiny'.*target 'other-model'"):
        store_for(folder, tiny_target, layers=[1, 3], name="other-model")
    with pytest.raises(DSparkError, match="bfloat16.*float32"):
        store_for(folder, tiny_target, layers=[1, 3], dtype="float32")
    # the trainer (head layers: the default) refuses it too, for features=store and for auto over the RAM limit
    for mode in (["features=store"], ["features=auto", "features_memory_gb=0"]):
        with pytest.raises(DSparkError, match=r"holds layers \[1, 3\]"):
            train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'out'}", *mode,
                              f"features_dir={folder}"))
    assert files(folder) == before   # never rewritten, never deleted
    # a store made from other rows under the same prompt ids
    other = [{**r, "input_ids": [(t + 1) % 256 for t in r["input_ids"]]} for r in rows[:3]]
    with pytest.raises(DSparkError, match="other tokens for 3 rows"):
        store_for(folder, tiny_target, layers=[1, 3]).missing(other)


def test_bad_store_settings_are_refused_up_front(data_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DSparkError, match="features=store needs features_dir"):
        train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'o'}", "features=store",
                          f"features_dir={tmp_path / 'a-file'}"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(DSparkError, match="features_dtype='float16' is not allowed"):
        check("train", compose_cfg("train", *FAST, f"output_dir={tmp_path / 'o'}", "features_dtype=float16"))


def test_the_old_per_chunk_cache_is_still_read(tmp_path, tiny_target, rows):
    layers = default_layer_ids(tiny_target.num_layers)
    tensors = {}
    for r in rows:
        feats, last = tiny_target.features(torch.tensor([r["input_ids"]]), layers)
        tensors[f"{r['prompt_id']}.layers"] = feats[0].to(torch.bfloat16)
        tensors[f"{r['prompt_id']}.last"] = last[0].to(torch.bfloat16)
    (tmp_path / "features").mkdir()
    save_file(tensors, str(tmp_path / "features" / "chunk-00000.safetensors"),
              metadata={"layers": json.dumps(layers), "target": tiny_target.name})
    src = FeatureSource(tiny_target, layers, str(tmp_path / "features"), "cache")
    src.prepare(rows, 0.0, 4)
    assert src.mode == "cache"


class FakeTarget:
    """Wide features made without a model: token id t at every position gives the value t everywhere."""
    name, hidden_size, device = "fake", 512, torch.device("cpu")

    def features(self, ids, layers):
        x = ids[..., None].to(torch.bfloat16)
        return x.expand(*ids.shape, len(layers) * self.hidden_size), x.expand(*ids.shape, self.hidden_size)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_reading_maps_the_shards_instead_of_loading_them(tmp_path):
    """A 100 MB store (4 KB per token): opening it and reading batches adds far less than its size to the
    process's resident memory, and every read row is the right one."""
    g = torch.Generator().manual_seed(0)
    fake_rows = [{"prompt_id": f"{i:08x}", "input_ids": torch.randint(1, 200, (500,), generator=g).tolist()}
                 for i in range(50)]
    store = FeatureStore(tmp_path / "big", "fake", [0, 1, 2], 512, create=True)
    store.build(FakeTarget(), fake_rows, 5, shard_tokens=8_000, bar=False)
    size = store.disk_bytes()
    assert size > 100e6 and len(store.shard_files()) == 3
    base = rss()
    reader = FeatureStore(tmp_path / "big", "fake", [0, 1, 2], 512)
    assert not reader.missing(fake_rows)   # checks every row's tokens: touches only the ids
    for r in fake_rows[::7]:
        layers, last = reader.get(r["prompt_id"], 300)
        want = torch.tensor(r["input_ids"][:300], dtype=torch.float32)[:, None]
        assert torch.equal(layers.float(), want.expand(-1, 1536)) and torch.equal(last.float(), want.expand(-1, 512))
    assert rss() - base < size / 4, (rss() - base, size)   # a full load would add all of it
    assert all(isinstance(m, np.memmap) for pair in reader.maps.values() for m in pair)


@pytest.mark.slow
def test_two_processes_build_one_store_and_train_as_from_memory(data_dir, tmp_path):
    """`accelerate launch` with 2 gloo processes, features=store: each rank builds its share of one store (its
    own shard files), then both read all of it; with every anchor drawn (tests/test_fsdp.py) the run equals
    one process at the same global batch with features in RAM."""
    import socket
    import subprocess
    import sys

    from conftest import REPO

    every = [*FAST[:3], "anchors_per_seq=64", "val_anchors_per_seq=8", "max_seq_len=96", "max_steps=4",
             "eval_every=2", "save_every=0", "optim.lr=3e-3", "optim.warmup_steps=0", f"data_dir={data_dir}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          os.path.join(REPO, "launch", "ddp-cpu.yaml"), "--main_process_port", str(port),
                          "-m", "dspark.train", *every, "batch_size=1", f"output_dir={tmp_path / 'two'}",
                          "features=store", "features_dtype=float32"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                              "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "train.json").read_text())
    assert report["processes"] == 2 and report["features"] == "store"
    shards = [p.name[:9] for p in (tmp_path / "two" / "features").glob("shard-*.safetensors")]
    assert sorted(set(shards)) == ["shard-000", "shard-001"]
    train(compose_cfg("train", *every, "batch_size=2", f"output_dir={tmp_path / 'one'}", "features=memory"))
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), rel=1e-5)
