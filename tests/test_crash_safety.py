"""Crash safety: `kill -9` in the middle of generate, train and export, then the same command again,
gives what an uninterrupted run gives, and leaves no half-written output behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO


def start(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dspark", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(*args):
    p = start(*args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]


def kill_when(p, ready, timeout=120):
    """SIGKILL `p` as soon as `ready()` holds (the interruption lands mid-run)."""
    t0 = time.time()
    while not ready():
        if p.poll() is not None:
            pytest.fail("the run ended before it could be interrupted")
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()


GEN = ["generate", "target=tiny", "max_prompts=24", "max_new_tokens=24", "batch_size=2", "chunk_size=2",
       "temperature=0.8", "heldout_fraction=0"]


def rows(out: Path) -> list:
    import datasets

    ds = datasets.load_from_disk(str(out / "dataset"))
    return list(zip(ds["prompt_id"], ds["input_ids"]))


def test_generate_killed_then_rerun_equals_uninterrupted(tmp_path):
    finish(*GEN, f"output_dir={tmp_path / 'a'}")
    b = tmp_path / "b"
    kill_when(start(*GEN, f"output_dir={b}"), lambda: len(list((b / "chunks").glob("chunk-*.jsonl"))) >= 2)
    assert not (b / "dataset").exists()
    finish(*GEN, f"output_dir={b}")
    assert rows(b) == rows(tmp_path / "a")       # sampled rows too: seeded per prompt
    assert not list(b.glob(".dataset-*")) and not list(b.glob(".generate-rank*.lock"))


def test_train_killed_then_resumed_equals_uninterrupted(data_dir, tmp_path):
    args = ["train", "target=tiny", "draft=tiny", "logger=none", f"data_dir={data_dir}", "max_steps=30",
            "eval_every=10", "save_every=5", "keep_checkpoints=2"]
    finish(*args, f"output_dir={tmp_path / 'a'}")
    b = tmp_path / "b"
    kill_when(start(*args, f"output_dir={b}"), lambda: (b / "checkpoints" / "step-0000010").is_dir())
    assert not (b / "head").exists()
    finish(*args, f"output_dir={b}", "resume=true")
    a_json, b_json = (json.loads((p / "train.json").read_text()) for p in (tmp_path / "a", b))
    assert b_json["steps"] == a_json["steps"] == 30
    assert [c["val_loss"] for c in b_json["curve"]] == pytest.approx([c["val_loss"] for c in a_json["curve"]],
                                                                     rel=1e-5)
    wa, wb = (load_file(str(p / "head" / "model.safetensors")) for p in (tmp_path / "a", b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_export_killed_then_rerun_is_whole(tiny_target, tmp_path):
    from conftest import tiny_head

    tiny_head(tiny_target, "markov", draft_vocab=200).save_pretrained(tmp_path / "head")
    args = ["export", "target=tiny", f"output_dir={tmp_path}", "dtype=float32"]
    finish(*args)
    first = {p.name: p.read_bytes() for p in (tmp_path / "export").rglob("*") if p.is_file() and p.name != "README.md"}
    for delay in (0.0, 0.5, 1.0, 2.0):          # kill at several points of the run
        p = start(*args)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        finish(*args)
        again = {p.name: p.read_bytes() for p in (tmp_path / "export").rglob("*")
                 if p.is_file() and p.name != "README.md"}
        assert again == first, f"export after a kill at {delay}s differs"
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")]
