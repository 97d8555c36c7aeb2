"""`dspark train` never silently reuses the wrong work and refuses bad input before any work: the
checkpoints folder belongs to one run, features=cache needs a cache, a dataset made for another target
is refused, and the loop never steps beyond max_steps."""
import json
import shutil

import pytest
import torch

import dspark.models.heads as heads
import dspark.train.trainer as trainer_mod
from conftest import compose_cfg
from dspark.data.dataset import load_rows
from dspark.core.errors import DSparkError
from dspark.train.trainer import Trainer, run as train

FAST = ["target=tiny", "draft=tiny", "logger=none", "batch_size=2", "anchors_per_seq=8", "val_anchors_per_seq=8",
        "max_seq_len=96"]


def snapshot(folder):
    """Every path under `folder` with its size and mtime (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def refused(monkeypatch, cfg, match):
    """The run is refused with one DSparkError before the target is loaded, and output_dir is unchanged."""
    def no_target(*a, **k):
        raise AssertionError("the target was loaded before the refusal")

    out = trainer_mod.Path(cfg.output_dir)
    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "load_target", no_target)
        with pytest.raises(DSparkError, match=match) as e:
            train(cfg)
    assert snapshot(out) == before
    return str(e.value)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished")
    train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={out}", "max_steps=4", "eval_every=2",
                      "save_every=2"))
    return out


def test_a_fresh_run_never_touches_another_runs_checkpoints(finished, data_dir, monkeypatch):
    msg = refused(monkeypatch, compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={finished}",
                                           "max_steps=8", "optim.lr=3e-3", "stop_after_steps=2", "save_every=1"),
                  "earlier run")
    assert str(finished / "checkpoints") in msg and "resume=true" in msg and "output_dir=" in msg


def test_resume_refuses_other_settings_and_missing_checkpoints(finished, data_dir, tmp_path, monkeypatch):
    msg = refused(monkeypatch, compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={finished}",
                                           "max_steps=4", "optim.lr=3e-3", "resume=true"), "other settings")
    assert "optim.lr" in msg and "step-0000004" in msg and "max_steps" not in msg
    refused(monkeypatch, compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'none'}",
                                     "resume=true"), "no checkpoint")
    assert not (tmp_path / "none").exists()


def test_resuming_a_finished_run_adds_no_step(finished, data_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)   # a moved folder still resumes; eval/save/logger settings may change
    train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={out}", "max_steps=4", "eval_every=3",
                      "resume=true"))
    report = json.loads((out / "train.json").read_text())
    assert report["steps"] == 4 and [p["step"] for p in report["curve"]] == [2, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_the_loop_never_steps_beyond_max_steps(data_dir, tmp_path):
    for n in (0, -1):
        summary = Trainer(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / str(n)}",
                                      f"max_steps={n}", "save_every=1")).fit()
        assert summary["steps"] == 0 and not (tmp_path / str(n) / "checkpoints").exists()


def test_nan_names_only_this_runs_checkpoint(data_dir, tmp_path):
    t = Trainer(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path}", "max_steps=6",
                            "eval_every=2", "save_every=2"))
    real = t.objective.forward_loss

    def poisoned(batch, gen, head):
        loss, count, out = real(batch, gen, head)
        return (loss * float("nan") if t.state["step"] >= 3 else loss), count, out

    t.objective.forward_loss = poisoned
    with pytest.raises(DSparkError, match="NaN") as e:
        t.fit()
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-0000002'}" in str(e.value)


def test_features_cache_without_a_cache_is_refused_up_front(data_dir, tmp_path, monkeypatch):
    msg = refused(monkeypatch, compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path}",
                                           "features=cache"), "features=cache")
    assert str(tmp_path / "features") in msg and "cache_features=true" in msg


def test_a_dataset_for_another_target_is_refused(data_dir, tmp_path):
    ds = tmp_path / "dataset"
    shutil.copytree(data_dir, ds)
    info = json.loads((ds / "dataset_info.json").read_text())
    assert json.loads(info["description"])["target"] == "tiny"
    info["description"] = json.dumps({**json.loads(info["description"]), "target": "SmolLM2-135M-Instruct"})
    (ds / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DSparkError, match="SmolLM2-135M-Instruct.*'tiny'.*dspark generate"):
        train(compose_cfg("train", *FAST, f"data_dir={ds}", f"output_dir={tmp_path / 'out'}", "max_steps=1"))
    assert not (tmp_path / "out").exists()
    info["description"] = ""   # an older dataset without the record passes
    (ds / "dataset_info.json").write_text(json.dumps(info))
    assert load_rows(str(ds), 96, 10**6, target="tiny")


def test_a_warm_start_takes_the_heads_weights_and_vocabulary_and_refuses_another_shape(data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={src}", "max_steps=2", "eval_every=2",
                      "save_every=0", "draft.draft_vocab_size=40"))
    state = load_file(str(src / "head" / "model.safetensors"))
    state["d2t"] = state["d2t"].flip(0)   # an order no fresh vocabulary (most frequent first) has
    save_file(state, str(src / "head" / "model.safetensors"))
    cfg = compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'warm'}", "max_steps=2",
                      "eval_every=2", "save_every=0", "draft.draft_vocab_size=40", f"init_from={src / 'head'}")
    t = Trainer(cfg)
    got = t.head.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items()) and torch.equal(t.head.t2d[state["d2t"]],
                                                                                   torch.arange(40))
    assert t.fit()["steps"] == 2   # and it trains on
    with pytest.raises(DSparkError, match=r"num_layers: head 1 vs draft 2.*draft=<its size>"):
        Trainer(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'x'}",
                            "draft.draft_vocab_size=40", "draft.num_layers=2", f"init_from={src / 'head'}"))
    with pytest.raises(DSparkError, match="not a draft head folder"):
        Trainer(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'y'}",
                            f"init_from={tmp_path}"))


def test_init_from_released_takes_the_committed_head_when_there_is_one_that_fits(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """`init_from=released`: heads/<target> with `optim.warm_start_lr`; none committed, or one of another
    shape: from scratch at `optim.lr`, saying why."""
    monkeypatch.setattr(heads, "RELEASED", tmp_path / "heads")
    base = [*FAST, f"data_dir={data_dir}", "draft.draft_vocab_size=40", "init_from=released", "optim.lr=1e-3",
            "optim.warm_start_lr=1e-5"]

    def peak_lr(t):
        return t.opt.param_groups[0]["initial_lr"]

    t = Trainer(compose_cfg("train", *base, f"output_dir={tmp_path / 'a'}"))
    assert t.init_from is None and peak_lr(t) == 1e-3 and "no released head for target tiny" in capsys.readouterr().out
    train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'src'}", "max_steps=2",
                      "eval_every=2", "save_every=0", "draft.draft_vocab_size=40"))
    shutil.copytree(tmp_path / "src" / "head", tmp_path / "heads" / "tiny")
    t = Trainer(compose_cfg("train", *base, f"output_dir={tmp_path / 'b'}"))
    released = heads.read_head(tmp_path / "heads" / "tiny").state_dict()
    assert t.init_from == "heads/tiny" and peak_lr(t) == 1e-5
    assert all(torch.equal(t.head.state_dict()[k], v) for k, v in released.items())
    assert t.fit()["init_from"] == "heads/tiny"
    t = Trainer(compose_cfg("train", *base, "draft.num_layers=2", f"output_dir={tmp_path / 'c'}"))
    assert t.init_from is None and peak_lr(t) == 1e-3 and "does not fit draft=" in capsys.readouterr().out
