"""`dspark run`: the whole pipeline on the tiny target end to end (sized down to seconds), then a
re-run that reuses every finished stage; stage configs are composed from each stage's own config."""
import json

import pytest

from conftest import compose_cfg
from dspark import pipeline

FAST = ["target=tiny", "draft=tiny", "max_prompts=6", "max_steps=4", "generate.max_new_tokens=12",
        "+generate.chunk_size=4", "+train.eval_every=2", "+train.save_every=2", "+calibrate.max_prompts=2",
        "+calibrate.max_new_tokens=12", "bench.prompts.limit=2", "bench.max_new_tokens=12", "bench.methods=[plain]"]


@pytest.fixture
def one_thread():
    """The tiny target's matmuls are too small to share: a second thread only waits (and on a busy
    2-core machine spinning OpenMP threads make each forward ~100× slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cfg(tmp_path, *extra):
    """The run config of `dspark run output_dir=… <FAST> <extra>` with short local prompts."""
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        prompts.write_text("".join(json.dumps({"prompt": f"say {w} twice"}) + "\n"
                                   for w in ["hi", "yes", "no", "red", "blue", "one", "two", "ten", "sun", "sky"]))
    local = ["+generate.data.source=jsonl", f"+generate.data.path={prompts}", "+bench.prompts.source=jsonl",
             f"+bench.prompts.path={prompts}"]
    return compose_cfg("run", f"output_dir={tmp_path}", *FAST, *local, *extra)


def test_stage_configs_compose_with_shared_overrides(tmp_path):
    cfg = run_cfg(tmp_path, "train.max_minutes=1.5", "draft.head_rank=4")
    train = pipeline.stage_config(cfg, "train")
    assert train.draft.name == "tiny" and train.draft.head_rank == 4 and train.draft.num_layers == 1
    assert train.max_steps == 4 and train.max_minutes == 1.5 and train.logger.name == "none"
    assert train.data_dir == f"{tmp_path}/dataset" and train.target.name == "tiny"
    assert train.init_from == "released" and train.optim.warm_start_lr == 1e-4 and train.optim.lr == 1e-3
    assert pipeline.stage_config(run_cfg(tmp_path, "train.init_from=null"), "train").init_from is None
    gen = pipeline.stage_config(cfg, "generate")
    assert gen.max_prompts == 6 and gen.max_new_tokens == 12 and gen.output_dir == str(tmp_path)
    bench = pipeline.stage_config(cfg, "bench")
    assert bench.prompts.limit == 2 and list(bench.methods) == ["plain"] and bench.head == f"{tmp_path}/head"


def test_bad_stage_override_is_one_clear_error(tmp_path):
    from dspark.core.errors import DSparkError

    with pytest.raises(DSparkError, match="train stage"):
        pipeline.run(run_cfg(tmp_path, "+train.no_such_key=1"))
    from dspark.settings import check

    with pytest.raises(DSparkError, match="stages="):
        check("run", run_cfg(tmp_path, "stages=[generate,fly]"))   # what the CLI guard runs first


def test_train_resumes_from_checkpoints_and_reuses_a_finished_run(tmp_path):
    cfg = pipeline.stage_config(run_cfg(tmp_path), "train")
    (tmp_path / "dataset").mkdir()
    assert pipeline._decide_train(cfg, tmp_path, same=True, ours=True) == "run"
    (tmp_path / "checkpoints" / "step-0000002").mkdir(parents=True)
    assert pipeline._decide_train(cfg, tmp_path, same=True, ours=True) == "resume"
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "train.json").write_text(json.dumps({"steps": 4, "wall_s": 1.0}))
    assert pipeline._decide_train(cfg, tmp_path, same=True, ours=True) == "reuse"
    from dspark.core.errors import DSparkError

    with pytest.raises(DSparkError, match="no earlier `dspark run`"):        # checkpoints it did not write
        pipeline._decide_train(cfg, tmp_path, same=False, ours=False)
    assert (tmp_path / "checkpoints" / "step-0000002").is_dir()
    assert pipeline._decide_train(cfg, tmp_path, same=False, ours=True) == "run"   # ours, settings changed
    assert not (tmp_path / "checkpoints").exists()


def test_a_new_release_retrains_a_run_that_refined_the_old_one(tmp_path, monkeypatch):
    """init_from=released: a finished run is reused until the committed head it refined changes."""
    import os

    import dspark.models.heads as heads

    cfg = pipeline.stage_config(run_cfg(tmp_path), "train")
    monkeypatch.setattr(heads, "RELEASED", tmp_path / "heads")
    released = tmp_path / "heads" / "tiny" / "model.safetensors"
    released.parent.mkdir(parents=True)
    released.write_bytes(b"old")
    (released.parent / "config.json").write_text("{}")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "train.json").write_text(json.dumps({"steps": 4, "wall_s": 1.0}))
    assert pipeline._decide_train(cfg, tmp_path, same=True, ours=True) == "reuse"
    later = (tmp_path / "train.json").stat().st_mtime + 10
    os.utime(released, (later, later))   # a new release
    assert pipeline._decide_train(cfg, tmp_path, same=True, ours=True) == "run"


def test_run_end_to_end_then_rerun_reuses(tmp_path, capsys, one_thread):
    result = pipeline.run(run_cfg(tmp_path))
    record = json.loads((tmp_path / "run.json").read_text())
    assert {s: r["status"] for s, r in record["stages"].items()} == {
        "generate": "ran", "train": "ran", "calibrate": "ran", "bench": "ran", "export": "ran"}
    for f in ["generate.json", "train.json", "calibrate.json", "bench.json", "bench.md", "export.json",
              "export/config.json", "export/model.safetensors", "export/README.md"]:
        assert (tmp_path / f).is_file(), f
    assert result["speedup"] is not None and record["export_dir"] == str(tmp_path / "export")
    out = capsys.readouterr().out
    assert "| plain |" in out and f"export: {tmp_path / 'export'}" in out
    bench_mtime = (tmp_path / "bench.json").stat().st_mtime

    pipeline.run(run_cfg(tmp_path))
    record = json.loads((tmp_path / "run.json").read_text())
    assert {s: r["status"] for s, r in record["stages"].items()} == {
        "generate": "reused", "train": "reused", "calibrate": "reused", "bench": "reused", "export": "ran"}
    assert (tmp_path / "bench.json").stat().st_mtime == bench_mtime
    assert sum(r["seconds"] for s, r in record["stages"].items() if s != "generate") < 10
    assert "bench reused" in capsys.readouterr().out
