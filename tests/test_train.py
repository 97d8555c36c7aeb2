"""The trainer: configs compose, a fixed batch is overfit, resume continues exactly, the trained tiny head
stays lossless in the runtime, and bad input gets one clear error."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, compose_cfg
from dspark.inference import DSparkDrafter, Engine
from dspark.models.dspark import DSparkDraft
from dspark.core.errors import DSparkError
from dspark.train.data import collate
from dspark.train.trainer import Trainer, run as train

FAST = ["target=tiny", "draft=tiny", "logger=none", "batch_size=2", "anchors_per_seq=8", "val_anchors_per_seq=8",
        "max_seq_len=96"]


@pytest.mark.parametrize("stage,overrides", [
    ("train", ["draft=tiny"]), ("train", ["draft=small"]), ("train", ["draft=base"]), ("train", ["draft=dflash"]),
    ("train", ["logger=none"]), ("train", ["experiment=quick"]), ("train", ["experiment=full"]),
    ("train", ["experiment=paper"]),
    ("bench", []), ("generate", ["data=hf"]), ("generate", ["data=jsonl"]), ("bench", ["prompts=mtbench"]),
])
def test_config_groups_compose(stage, overrides):
    cfg = compose_cfg(stage, *overrides)
    assert cfg.output_dir and cfg.seed == 0


def test_position_weight_decay_setting_reaches_the_loss():
    from dspark.train.losses import TargetDist, block_losses, position_weights

    assert torch.allclose(position_weights(7), torch.exp(-torch.arange(7.0) / 7))
    assert torch.allclose(position_weights(7, decay=4), torch.exp(-torch.arange(7.0) / 4))
    torch.manual_seed(0)
    t2d = torch.cat([torch.arange(10), torch.tensor([10, 10])])
    args = (torch.randn(3, 7, 10), torch.randn(3, 7), TargetDist.from_full(torch.randn(3, 7, 12), torch.arange(10), t2d),
            torch.randint(0, 10, (3, 7)), torch.ones(3, 7, dtype=torch.bool))
    alpha = {"ce": 0.1, "l1": 0.9, "conf": 1.0}
    assert block_losses(*args, {**alpha, "decay": 4})["loss"] < block_losses(*args, alpha)["loss"]
    cfg = compose_cfg("train", "experiment=paper")
    assert (cfg.loss.decay, cfg.draft.num_layers, cfg.draft.head_rank, cfg.draft.draft_vocab_size) == (4, 5, 256, 0)


def test_overfits_a_fixed_batch(data_dir, tmp_path):
    t = Trainer(compose_cfg("train", *FAST, f"output_dir={tmp_path}", f"data_dir={data_dir}", "optim.lr=3e-3",
                            "optim.warmup_steps=0"))
    batch = collate(t.train_rows[:2])
    losses = []
    for _ in range(40):
        loss, count, _ = t.objective.forward_loss(batch, torch.Generator().manual_seed(0), t.head)
        (loss / count).backward()
        t.opt.step()
        t.opt.zero_grad()
        losses.append(float(loss.detach() / count))
    assert losses[-1] < losses[0] / 1.5, losses   # the stated factor: at least 1.5× lower after 40 steps


def test_losses_read_the_targets_whole_vocabulary_through_kept_row_statistics(data_dir, tmp_path):
    """A step scores the target over the draft vocabulary only, with each row's log-partition and argmax
    over the whole vocabulary computed once and kept: the losses equal those of the target's full logits,
    whichever batch (and place in it) a row comes in."""
    import torch.nn.functional as F

    from dspark.train.losses import TargetDist

    t = Trainer(compose_cfg("train", *FAST, f"output_dir={tmp_path}", f"data_dir={data_dir}",
                            "draft.draft_vocab_size=20"))
    head, obj, rows = t.head, t.objective, t.train_rows
    assert head.config.draft_vocab_size < t.target.vocab_size
    for batch in (collate(rows[:3]), collate([rows[2], rows[5], rows[0]])):
        _, _, anchors, valid, _, got = obj.blocks(batch, torch.Generator().manual_seed(1), head)
        _, last = obj.features(batch)
        pos = (anchors[..., None] + torch.arange(head.config.gamma)).clamp_max(last.shape[1] - 1)
        h = last.gather(1, pos.view(len(anchors), -1, 1).expand(-1, -1, last.shape[-1]))
        full = t.target.logits(h).view(*valid.shape, -1)
        want = TargetDist.from_full(full, head.d2t, head.t2d)
        assert torch.allclose(got.probs()[valid], want.probs()[valid], atol=1e-5)
        assert torch.equal(got.top[valid], want.top[valid])
        assert bool((want.top[valid] == head.config.draft_vocab_size).any())   # some argmax outside the vocabulary
        p_full = F.softmax(full.float(), -1)                                  # probability mass outside it
        assert torch.allclose(1 - got.probs().sum(-1)[valid], 1 - p_full[..., head.d2t].sum(-1)[valid], atol=1e-5)
        each_step = type(obj)(obj.model, obj.target, obj.features, obj.anchors_per_seq, obj.alpha, keep_stats=False)
        again = each_step.blocks(batch, torch.Generator().manual_seed(1), head)[-1]   # keep_target_stats=false
        assert torch.allclose(again.probs()[valid], want.probs()[valid]) and not each_step.row_stats
    assert set(obj.row_stats) == {rows[i]["prompt_id"] for i in (0, 1, 2, 5)}


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    common = [*FAST, f"data_dir={data_dir}", "max_steps=6", "eval_every=2", "save_every=2"]
    full = train(compose_cfg("train", *common, f"output_dir={tmp_path / 'full'}"))
    train(compose_cfg("train", *common, f"output_dir={tmp_path / 'cut'}", "stop_after_steps=4"))
    assert (tmp_path / "cut" / "checkpoints" / "step-0000004").is_dir()
    train(compose_cfg("train", *common, f"output_dir={tmp_path / 'cut'}", "resume=true"))
    a = json.loads((tmp_path / "full" / "train.json").read_text())
    b = json.loads((tmp_path / "cut" / "train.json").read_text())
    assert [p["step"] for p in b["curve"]] == [2, 4, 6]
    for p, q in zip(a["curve"], b["curve"]):
        assert p["train_loss"] == pytest.approx(q["train_loss"], rel=1e-5)
        assert p["val_loss"] == pytest.approx(q["val_loss"], rel=1e-5)
    wa = load_file(str(tmp_path / "full" / "head" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "head" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert full["val_tau"] == pytest.approx(b["val_tau"], rel=1e-5)
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step-*"))) == 2   # rotation keeps two


def test_wall_time_holds_the_last_validation(data_dir, tmp_path, monkeypatch):
    """A slow final validation must not make the training rate negative or inflated."""
    import time
    import dspark.train.trainer as trainer

    def slow_tau(*args):
        time.sleep(0.3)
        return real(*args)

    real = trainer.expected_tau
    monkeypatch.setattr(trainer, "expected_tau", slow_tau)
    train(compose_cfg("train", *FAST, f"data_dir={data_dir}", "max_steps=2", "eval_every=2", "save_every=0",
                      f"output_dir={tmp_path}"))
    out = json.loads((tmp_path / "train.json").read_text())
    assert out["val_s"] >= 0.6 and out["wall_s"] > out["val_s"]
    assert 0 < out["positions_per_s"] == pytest.approx(out["train_positions"] / (out["wall_s"] - out["val_s"]))


def test_trained_head_learns_and_stays_lossless(data_dir, tmp_path, tiny_target, tiny_prompts):
    summary = train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path}", "max_steps=40",
                                "eval_every=40", "save_every=0", "optim.lr=3e-3"))
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["curve"][-1]["val_tau"] > 1.0 and summary["val_tau"] == report["val_tau"]
    assert report["val_loss"] < report["curve"][0]["val_loss"] or len(report["curve"]) == 1
    head = DSparkDraft.from_pretrained(tmp_path / "head")
    plain = Engine(tiny_target).generate(tiny_prompts, 40).outputs
    for batch in (1, 3):
        outs = []
        for s in range(0, 3, batch):
            outs += Engine(tiny_target, DSparkDrafter(head, tiny_target), gamma=7).generate(
                tiny_prompts[s:s + batch], 40).outputs
        assert outs == plain


def test_walk_tau_steps_over_accepted_runs():
    from dspark.train.losses import walk_tau

    # anchors 10..16 predict response tokens 11..17: steps from 10 (two drafts accepted: 11, 12 and the
    # target's 13), 13 (one: 14, 15), 15 and 16 (the last token: the step makes only 17)
    lead = torch.tensor([2, 0, 0, 1, 0, 0, 0])
    assert walk_tau(lead, torch.arange(10, 17), torch.ones(7, dtype=torch.bool)) == (7, 4)
    assert walk_tau(torch.full((7,), 7), torch.arange(10, 17), torch.ones(7, dtype=torch.bool)) == (7, 1)
    assert walk_tau(lead, torch.arange(7), torch.zeros(7, dtype=torch.bool)) == (0, 0)
    gap = torch.tensor([True, True, True, False, True, True, True])               # a second turn after a gap
    assert walk_tau(torch.tensor([0, 5, 5, 0, 0, 0, 0]), torch.arange(10, 17), gap) == (3, 2)


def test_walk_tau_is_the_runtime_tau_of_verify_all(data_dir, tmp_path):
    """On greedy self-distilled rows (fp32 tiny target) the validation walk predicts, row by row, the
    tokens and target forwards of the runtime verifying every drafted token."""
    t = Trainer(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path}", "max_steps=80",
                            "eval_every=80", "save_every=0", "optim.lr=3e-3"))
    report = t.fit()
    assert 1.0 < report["val_tau_walk"] and "val_tau_walk" in report["curve"][-1]
    train(compose_cfg("train", *FAST, f"data_dir={data_dir}", f"output_dir={tmp_path / 'off'}", "max_steps=2",
                      "eval_every=2", "save_every=0", "val_walk_rows=0"))
    off = json.loads((tmp_path / "off" / "train.json").read_text())
    assert "val_tau_walk" not in off and off["val_tau"] > 0
    t.head.eval()
    engine = Engine(t.target, DSparkDrafter(t.head, t.target), gamma=7)
    accepted = 0
    for row in t.train_rows:
        start = row["loss_mask"].index(1)
        want = t.objective.walk(collate([row]), t.head, 5)
        assert t.objective.walk(collate([row]), t.head, 500) == want      # passes of 5 anchors change nothing
        res = engine.generate([row["input_ids"][:start]], sum(row["loss_mask"]))
        assert res.outputs[0] == row["input_ids"][start:]
        assert (res.stats.tokens, res.stats.request_steps) == want
        accepted += res.stats.accepted
    assert accepted > 0        # drafts were accepted (at the first anchor too): more than plain steps tested


def test_bad_input_is_one_clear_error(data_dir, tmp_path):
    with pytest.raises(DSparkError, match="no dataset"):
        train(compose_cfg("train", *FAST, f"output_dir={tmp_path}", f"data_dir={tmp_path / 'nothing'}"))
    with pytest.raises(DSparkError, match="out of range"):
        train(compose_cfg("train", *FAST, f"output_dir={tmp_path}", f"data_dir={data_dir}",
                          "draft.target_layer_ids=[2,40]"))
    with pytest.raises(DSparkError, match="NaN"):
        train(compose_cfg("train", *FAST, f"output_dir={tmp_path}", f"data_dir={data_dir}", "loss.ce=nan"))
    assert not (tmp_path / "head").exists() and not (tmp_path / "train.json").exists()


def test_cli_reports_bad_input_without_traceback(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    res = subprocess.run([sys.executable, "-m", "dspark.train", "target=tiny", f"output_dir={tmp_path / 'x'}"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 2 and "no dataset" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_two_process_accelerate_run(data_dir, tmp_path):
    accel = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    res = subprocess.run([accel, "launch", "--multi_gpu", "--num_processes", "2", "-m", "dspark.train", *FAST,
                          f"data_dir={data_dir}", f"output_dir={tmp_path}", "max_steps=4", "eval_every=4"],
                         capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4


def test_multirun_sweep_writes_one_folder_per_size_and_a_summary(data_dir, tmp_path):
    res = subprocess.run([sys.executable, "-m", "dspark.train", "--multirun", "draft=tiny,dflash", *FAST[:1], *FAST[2:],
                          f"data_dir={data_dir}", f"output_dir={tmp_path}", "max_steps=2", "eval_every=2",
                          "save_every=0"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted(r["draft"] for r in rows) == ["dflash", "tiny"] and all("draft=" in r["run"] for r in rows)
    assert {r["objective"] for r in rows} == {"dspark", "dflash"}
    assert all(r["val_tau"] >= 1.0 and r["trainable_params"] > 0 for r in rows)
    assert all((tmp_path / r["run"] / "head" / "config.json").is_file() for r in rows)
    assert "| tiny |" in (tmp_path / "sweep.md").read_text()


def test_step_cost_benchmark_prints_both_steps_side_by_side(data_dir, capsys):
    """`python -m dspark.train_cost`: the same batches with the whole vocabulary each step and with kept
    statistics, and their ratio (the figure README quotes)."""
    from dspark.train_cost import main

    main([*FAST, f"data_dir={data_dir}"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| median of"))
    whole, kept, ratio = (float(c.split()[0]) for c in row.strip("|").split("|")[1:])
    # the times are printed to 0.1 ms and the ratio to 0.01, both from the unrounded medians
    assert whole > 0 and kept > 0 and abs(ratio - kept / whole) <= 0.005 + 0.1 / whole + 1e-9
    assert "first sight of a row" in out


def test_step_cost_benchmark_refuses_bad_input_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dspark.train_cost", "target=tiny", f"data_dir={tmp_path / 'none'}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no dataset at" in r.stderr and "Traceback" not in r.stderr
