"""`dspark run`: generate → train → calibrate → bench → export into one output_dir.

Each stage is composed from its own config (conf/<stage>.yaml, the same as `dspark <stage>`), gets
the run's shared keys (target, output_dir, seed; draft, max_steps, max_minutes for train;
max_prompts for generate) and its section of conf/run.yaml as overrides, and runs through its
importable `run(cfg)`. Finished work is
reused, so a re-run after an interruption resumes instead of restarting:

- generate: resumable by itself (finished chunks are kept; a finished dataset is "nothing to do");
- train: reused when train.json and the head exist, are newer than the dataset (and than the committed
  head it refines, with init_from=released) and the run reached max_steps or max_minutes; otherwise
  resumed from its latest checkpoint (resume=true) when there is one written with the same settings;
- calibrate, bench: reused when their json is newer than every input and the settings are the same;
- export: always (cheap; replaces the export folder whole).

Settings are compared through a hash of each stage's resolved config, kept in run.json.

Default size (conf/run.yaml, SmolLM2-135M, 2 CPU threads), from measured stage speeds: generate 350
prompts × ≤128 tokens ≈ 39k response tokens at ≈185 tok/s (batch 48) ≈ 3.5 min; train: target features
≈0.7 min then up to 750 steps in ≈6 min (`max_minutes`), refining the committed head when the target has
one (`init_from=released`); calibrate 48 held-out prompts ≈ 1 min; bench 10
HumanEval prompts × 128 tokens for plain (≈20 tok/s), oracle, prompt lookup and the head in three
policies ≈ 5.5 min; export seconds. About 17 minutes in all, plus the one-time GGUF conversion.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from dspark.core.files import write_json_atomic
from dspark.core.errors import DSparkError

from .settings import check

RUNNERS = {"generate": "dspark.data.generate", "train": "dspark.train.trainer", "calibrate": "dspark.eval.calibrate",
           "bench": "dspark.eval.bench", "export": "dspark.hub.export"}


def run(cfg) -> dict:
    out = Path(cfg.output_dir)
    configs = {s: stage_config(cfg, s) for s in cfg.stages}   # all composed first: a bad override fails early
    for stage, scfg in configs.items():                       # and every stage's settings checked before any work
        check(stage, scfg)
    _check_serving_layout(configs)
    fingerprints = {s: fingerprint(c) for s, c in configs.items()}
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_json(out / "run.json") or {}
    record = {"output_dir": str(out), "target": cfg.target.name, "stages": {}}
    t_all = time.perf_counter()
    for stage in cfg.stages:
        scfg, fp = configs[stage], fingerprints[stage]
        before = (previous.get("stages") or {}).get(stage)   # this stage's record from an earlier dspark run
        decision = DECIDE[stage](scfg, out, same=(before or {}).get("fingerprint") in (None, fp), ours=bool(before))
        t0 = time.perf_counter()
        if decision == "reuse":
            status = "reused"
        else:
            if decision == "resume":
                with open_dict(scfg):
                    scfg.resume = True
            print(f"[dspark run] {stage}: {'resuming' if decision == 'resume' else 'running'} …", flush=True)
            before = _mtime(out / f"{stage}.json")
            importlib.import_module(RUNNERS[stage]).run(scfg)
            status = "resumed" if decision == "resume" else "ran"
            if stage == "generate" and _mtime(out / "generate.json") == before != float("inf"):
                status = "reused"   # generate found every prompt done ("nothing to do")
        seconds = time.perf_counter() - t0
        print(f"[dspark run] {stage}: {status} in {seconds:.1f}s", flush=True)
        record["stages"][stage] = {"status": status, "seconds": seconds, "fingerprint": fp}
        write_json_atomic(out / "run.json", record)   # progress survives an interruption
    record["seconds"] = time.perf_counter() - t_all
    record["bench_md"] = str(out / "bench.md") if (out / "bench.md").is_file() else None
    record["plots"] = [str(p) for p in sorted(out.glob("*.png")) + sorted(out.glob("*.svg"))]
    export_dir = configs["export"].export_dir if "export" in configs else None
    record["export_dir"] = export_dir if export_dir and Path(export_dir).is_dir() else None
    write_json_atomic(out / "run.json", record)
    _final_report(record)
    from dspark.core.methods import head_row

    bench = _read_json(out / "bench.json") or {}
    speedups = [(head_row(bench, h) or {}).get("speedup_vs_plain") for h in ("dspark", "dflash")]
    return {"speedup": max((s for s in speedups if s is not None), default=None), "seconds": record["seconds"]}


def _check_serving_layout(configs: dict) -> None:
    """An export with vllm=true would refuse a head trained with an architecture speculators cannot
    express: say so before training it, not after."""
    from dspark.hub.layouts import architecture_refusals

    if "train" in configs and configs.get("export") is not None and configs["export"].vllm:
        d = configs["train"].draft
        why = architecture_refusals(d.sequential_head, bool(d.get("qk_norm")), d.get("mask_token_id", "auto")) \
            if (d.get("architecture") or "dspark") == "dspark" else []
        if why:
            raise DSparkError(f"export.vllm=true cannot write this draft in the speculators layout: {'; '.join(why)}. "
                              "Pass export.vllm=false or keep the conf/draft defaults")


# ------------------------------------------------------------------ composing the stages
def stage_config(cfg, stage: str):
    """conf/<stage>.yaml with the run's section as overrides and the shared keys set."""
    overrides = flatten(cfg.get(stage) or {})
    if stage == "train" and cfg.get("draft"):
        overrides = draft_overrides(cfg.draft) + overrides
    shortcuts = {"generate": ["max_prompts"], "train": ["max_steps", "max_minutes"]}.get(stage, [])
    overrides += [f"{k}={_value(cfg[k])}" for k in shortcuts if cfg.get(k) is not None]
    scfg = _compose(stage, overrides)
    with open_dict(scfg):
        scfg.target = OmegaConf.create(OmegaConf.to_container(cfg.target, resolve=False))
        scfg.output_dir = str(cfg.output_dir)
        scfg.seed = cfg.seed
        scfg.pop("hydra", None)
    return scfg


def draft_overrides(draft) -> list[str]:
    """`draft=<name>` plus the keys the run changed from that size's file (so that an experiment's
    own draft settings still apply where the run did not override them)."""
    from importlib.resources import files

    base = OmegaConf.create(files("dspark.conf").joinpath("draft", f"{draft.name}.yaml").read_text())
    mine = OmegaConf.to_container(draft, resolve=True)
    changed = {k: v for k, v in mine.items() if k not in base or base[k] != v}
    return [f"draft={draft.name}"] + flatten(changed, "draft.")


def _compose(stage: str, overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():   # inside `dspark run` (@hydra.main)
            return compose(config_name=stage, overrides=overrides)
        with initialize_config_module(config_module="dspark.conf", version_base="1.3"):
            return compose(config_name=stage, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise DSparkError(f"cannot build the {stage} stage with overrides {overrides}: "
                          f"{str(e).splitlines()[0]}") from None


def flatten(section, prefix: str = "") -> list[str]:
    """{experiment: quick, prompts: {limit: 10}} → ['experiment=quick', 'prompts.limit=10']."""
    items = []
    for k, v in (OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section).items():
        if isinstance(v, dict) and v:
            items += flatten(v, f"{prefix}{k}.")
        else:
            items.append(f"{prefix}{k}={_value(v)}")
    return items


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{}" if not v else "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    return s if re.fullmatch(r"[\w./~:+-]+", s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fingerprint(scfg) -> str:
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(scfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise DSparkError(f"stage config incomplete: {str(e).splitlines()[0]}") from None
    data.pop("resume", None)   # resuming is how a stage runs, not what it computes
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ what to reuse
def _mtime(p) -> float:
    p = Path(p)
    return p.stat().st_mtime if p.exists() else float("inf")


def _newer(output: Path, inputs: list) -> bool:
    return output.is_file() and all(output.stat().st_mtime >= _mtime(i) for i in inputs)


def _decide_generate(scfg, out: Path, same: bool, ours: bool) -> str:
    return "run"   # resumable by itself: a finished dataset costs one target load ("nothing to do")


def _decide_train(scfg, out: Path, same: bool, ours: bool) -> str:
    from dspark.models.heads import released_head

    summary = _read_json(out / "train.json")
    head = out / "head" / "model.safetensors"
    data = Path(scfg.data_dir)
    released = released_head(scfg.target.name) if scfg.get("init_from") == "released" else None
    inputs = [data] + ([released / "model.safetensors"] if released else [])   # a new release: a new start
    finished = bool(summary) and (summary.get("steps", 0) >= scfg.max_steps or (
        scfg.max_minutes is not None and summary.get("wall_s", 0) >= scfg.max_minutes * 60))
    if same and finished and head.is_file() and _newer(out / "train.json", inputs):
        return "reuse"
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    if ckpts and same and all(_mtime(ckpts[-1]) >= _mtime(i) for i in inputs):
        return "resume"
    if ckpts and not ours:   # not written by an earlier `dspark run` here: never ours to delete
        raise DSparkError(f"{out / 'checkpoints'} holds checkpoints that no earlier `dspark run` in this folder "
                          "wrote: pass a new output_dir= (or continue them with dspark train resume=true)")
    if ckpts:   # our own, written with other settings or before the dataset changed: start over
        print(f"[dspark run] train: settings or data changed; discarding {len(ckpts)} old checkpoint(s)")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return "run"


def _decide_calibrate(scfg, out: Path, same: bool, ours: bool) -> str:
    head = Path(str(scfg.head))
    return "reuse" if same and _newer(out / "calibrate.json", [head / "model.safetensors"]) else "run"


def _decide_bench(scfg, out: Path, same: bool, ours: bool) -> str:
    head = Path(str(scfg.head))
    inputs = [head / "model.safetensors", head / "config.json"] if head.is_dir() else []
    if (out / "calibrate.json").is_file():
        inputs.append(out / "calibrate.json")
    return "reuse" if same and _newer(out / "bench.json", inputs) else "run"


def _decide_export(scfg, out: Path, same: bool, ours: bool) -> str:
    return "run"


DECIDE = {"generate": _decide_generate, "train": _decide_train, "calibrate": _decide_calibrate,
          "bench": _decide_bench, "export": _decide_export}


# ------------------------------------------------------------------ reporting
def _final_report(record: dict) -> None:
    print("\n[dspark run] " + ", ".join(f"{s} {r['status']} ({r['seconds']:.0f}s)" for s, r in record["stages"].items())
          + f"; {record['seconds'] / 60:.1f} min in all")
    if record["bench_md"]:
        print("\n" + Path(record["bench_md"]).read_text().rstrip() + "\n")
    for p in record["plots"]:
        print(f"plot: {p}")
    if record["export_dir"]:
        print(f"export: {record['export_dir']}")
    print(f"summary: {Path(record['output_dir']) / 'run.json'}")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
