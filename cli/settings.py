"""Every numeric and choice setting of every stage, checked in one place before the stage does any work.

`check(stage, cfg)` raises one DSparkError naming the first bad setting, its value and the allowed
range. The ranges here are the ones the config comments state (conf/<stage>.yaml). Checks that need
the loaded target (layer ids against its depth, prompt length against its context) stay in the stages.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dspark.core.errors import DSparkError
from dspark.core.methods import DRAFTER_FREE, split_policy
from dspark.inference.drafters import DRAFT_WEIGHTS
from dspark.models.cpu_gemm import MODES as CPU_GEMM_MODES
from dspark.models.heads import HEADS
from dspark.models.target import DTYPES as TARGET_DTYPES

_ABSENT = object()   # a key this config does not have


class Rule:
    """A setting's allowed values: `ok(v)`, and `describe()` for the error message."""

    def ok(self, v) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Num(Rule):
    """An int (`integer=True`) or a finite real number in [lo, hi]; `open_lo` excludes lo; `null` allows None."""
    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    open_lo: bool = False
    null: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)) or not math.isfinite(v):
            return False
        low_bad = self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo)
        return not low_bad and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        bounds = ([f"{'>' if self.open_lo else '>='} {self.lo:g}"] if self.lo is not None else []) + \
                 ([f"<= {self.hi:g}"] if self.hi is not None else [])
        return " ".join(["an integer" if self.integer else "a number", " and ".join(bounds)]).strip() \
            + (" (or null)" if self.null else "")


def Int(lo=None, hi=None, null=False) -> Num:
    return Num(lo, hi, integer=True, null=null)


def Pos(null=False) -> Num:
    """A real number > 0."""
    return Num(0, None, open_lo=True, null=null)


@dataclass(frozen=True)
class Choice(Rule):
    options: tuple

    def ok(self, v) -> bool:
        return v in self.options

    def describe(self) -> str:
        return "one of " + "|".join("null" if o is None else str(o) for o in self.options)


class Bool(Rule):
    def ok(self, v) -> bool:
        return isinstance(v, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Each(Rule):
    """A list whose items each follow `rule`, with at least `min_len` items (`null` allows None)."""
    rule: Rule
    min_len: int = 0
    null: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        return isinstance(v, (list, tuple)) and len(v) >= self.min_len and all(self.rule.ok(x) for x in v)

    def describe(self) -> str:
        least = f" (at least {self.min_len})" if self.min_len else ""
        return f"a list{least} of {self.rule.describe()}" + (" (or null)" if self.null else "")


@dataclass(frozen=True)
class Either(Rule):
    """A value that follows one of `rules`."""
    rules: tuple

    def ok(self, v) -> bool:
        return any(r.ok(v) for r in self.rules)

    def describe(self) -> str:
        return " or ".join(r.describe() for r in self.rules)


class Policy(Rule):
    """A verification policy name, as inference/policy.py's `parse_policy` reads it, optionally prefixed
    `lookup+` (the head combined with prompt lookup, core/methods.py `split_policy`)."""

    def ok(self, v) -> bool:
        from dspark.inference.policy import parse_policy

        try:
            parse_policy(split_policy(v)[1])
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        from dspark.inference.policy import POLICIES

        return POLICIES + ", each optionally prefixed lookup+ (lookup alone = lookup+all)"


class MixSources(Rule):
    """`data.sources` of `data=mix`: checked by data/sources.py's `mix_components`, whose one error line
    names the bad component (unknown source, count < 1, count and weight, missing path, ...)."""

    def ok(self, v) -> bool:
        from dspark.data.sources import mix_components

        mix_components(v)
        return True

    def describe(self) -> str:
        return "a list of {source: <name>, count: <n >= 1>} (or weight: <w > 0>)"


@dataclass(frozen=True)
class Text(Rule):
    """A string that fully matches `pattern` (described as `what`); `null` allows None."""
    pattern: str = r"\S.*"
    what: str = "a non-empty string"
    null: bool = False

    def ok(self, v) -> bool:
        import re

        return self.null if v is None else isinstance(v, str) and re.fullmatch(self.pattern, v) is not None

    def describe(self) -> str:
        return self.what + (" (or null)" if self.null else "")


PIPELINE = ("generate", "train", "calibrate", "bench", "export")   # the stages of `dspark run`, in order
FRACTION = Num(0, 1)                 # [0, 1]
SHARE = Num(0, 0.99)                 # a share held out: something must remain
TEMPERATURE = Num(0)                 # 0 = greedy
TOP_P = Num(0, 1, open_lo=True)      # (0, 1]
DTYPES = Choice(tuple(TARGET_DTYPES))
TARGET = {"target.dtype": DTYPES, "target.attn_implementation": Choice(("eager", "sdpa")),
          "target.grouped_attention": Bool(), "target.cpu_gemm": Choice(CPU_GEMM_MODES)}
COMMON = {"seed": Int(0), **TARGET}

RULES: dict[str, dict] = {
    "generate": {
        **COMMON,
        "data.source": Choice(("sharegpt", "code", "gsm8k", "jsonl", "hf", "mix")), "data.max_chars": Int(1),
        "data.sources": MixSources(),
        "max_prompts": Int(1, null=True), "heldout_fraction": SHARE, "max_new_tokens": Int(1),
        "temperature": TEMPERATURE, "top_p": TOP_P, "batch_size": Int(1), "chunk_size": Int(1),
        "max_prompt_tokens": Int(1), "cache_features": Bool(), "feature_layers": Each(Int(0), 1, null=True),
        "stop_after_chunks": Int(1, null=True), "merge_only": Bool(), "top_k": Int(0),
        "backend": Choice(("inprocess", "server")),
        "responses": Choice(("regenerate", "original")),
        "server.url": Text(r"https?://[^\s/]+(/\S*)?", "an http:// or https:// URL", null=True),
        "server.model": Text(null=True), "server.api": Choice(("auto", "openai", "llamacpp")),
        "server.max_in_flight": Int(1), "server.timeout_s": Pos(), "server.retries": Int(0),
    },
    "train": {
        **COMMON,
        "features": Choice(("auto", "memory", "online", "cache", "store")), "features_memory_gb": Num(0),
        "features_dtype": Choice(("bfloat16", "float32")),
        "feature_batch_size": Int(1), "val_fraction": SHARE, "val_data_dir": Text(null=True), "max_seq_len": Int(2),
        "batch_size": Int(1),
        "grad_accum": Int(1), "anchors_per_seq": Int(1), "val_anchors_per_seq": Int(1), "val_walk_rows": Int(0, null=True),
        "max_steps": Int(1),
        "max_minutes": Pos(null=True), "eval_every": Int(1), "save_every": Int(0), "keep_checkpoints": Int(1),
        "resume": Bool(), "init_from": Text(null=True), "stop_after_steps": Int(1, null=True), "bf16_autocast": Bool(), "keep_target_stats": Bool(),
        "loss.ce": Num(0), "loss.l1": Num(0), "loss.conf": Num(0), "loss.decay": Pos(null=True),
        "loss.labels": Choice((None, "data", "target")),
        "optim.lr": Pos(), "optim.warm_start_lr": Pos(null=True), "optim.betas": Each(Num(0, 0.9999), 2), "optim.weight_decay": Num(0),
        "optim.warmup_steps": Int(0), "optim.min_lr_ratio": FRACTION, "optim.grad_clip": Num(0, null=True),
        "draft.architecture": Choice(tuple(HEADS)), "draft.num_layers": Int(1),
        "draft.num_attention_heads": Int(1, null=True), "draft.num_key_value_heads": Int(1, null=True),
        "draft.intermediate_size": Int(1, null=True), "draft.gamma": Int(1, 64),
        "draft.sequential_head": Choice(("markov", "rnn", "none")), "draft.head_rank": Int(1),
        "draft.draft_vocab_size": Int(0), "draft.target_layer_ids": Each(Int(0), 1, null=True),
        "draft.init_from_target": Bool(), "draft.qk_norm": Bool(),
        "draft.mask_token_id": Either((Choice(("auto",)), Int(0, null=True))), "logger.name": Choice(("none", "wandb")),
    },
    "calibrate": {
        **COMMON,
        "val_fraction": SHARE, "max_prompts": Int(1), "max_new_tokens": Int(1), "batch_size": Int(1),
        "temperature": TEMPERATURE, "bins": Int(2), "min_blocks": Int(1),
    },
    "bench": {
        **COMMON,
        "prompts.source": Choice(("humaneval", "mtbench", "jsonl")), "prompts.limit": Int(1, null=True),
        "max_new_tokens": Int(1), "ignore_eos": Bool(), "temperature": TEMPERATURE, "top_p": TOP_P,
        "concurrency": Each(Int(1), 1), "gamma": Int(1, 64),
        "methods": Each(Choice(("plain",) + DRAFTER_FREE)),
        "released_head": Bool(), "policies": Each(Policy()), "threshold": Num(0, 1, open_lo=True),
        "prompts_per_level": Int(1, null=True), "sched.unit": Choice(("column", "position")), "packed": Bool(),
        "draft_weights": Choice(DRAFT_WEIGHTS), "draft_compile": Bool(),
        "sched.profile_context": Int(1), "sched.profile_repeats": Int(1), "sched.reprofile": Bool(),
        "prompt_lookup.max_ngram": Int(1), "prompt_lookup.min_ngram": Int(1), "prompt_lookup.head_cost": Num(0, null=True), "near_tie_margin": Num(0),
        "load.rates": Each(Pos()), "load.requests": Int(1), "load.max_batch": Int(1), "load.seed": Int(0),
    },
    "export": {
        **COMMON,
        "dtype": DTYPES, "vllm": Bool(), "push_to_hub": Bool(), "private": Bool(), "dry_run": Bool(),
    },
    "run": {
        **COMMON,
        "max_prompts": Int(1, null=True), "max_steps": Int(1, null=True), "max_minutes": Pos(null=True),
        "stages": Each(Choice(PIPELINE), 1),
    },
}


def _value(cfg, key: str):
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise DSparkError(f"setting {key} cannot be resolved ({str(e).splitlines()[0]}): set {key}=<value>") from None


def check(stage: str, cfg) -> None:
    """One DSparkError for the first setting of `stage` outside its range; then the output folder."""
    for key, rule in RULES[stage].items():
        v = _value(cfg, key)
        if v is _ABSENT:        # optional key (e.g. draft.sequential_head of an EAGLE-3 size)
            continue
        if OmegaConf.is_config(v):
            v = OmegaConf.to_container(v, resolve=True)
        if not rule.ok(v):
            shown = repr(v) if isinstance(v, str) else v
            raise DSparkError(f"{key}={shown} is not allowed: use {rule.describe()}")
    _cross_checks(stage, cfg)
    check_output_dir(cfg.output_dir)


def _cross_checks(stage: str, cfg) -> None:
    if stage == "generate" and cfg.responses == "original" and cfg.backend == "server":
        raise DSparkError("responses=original reads the answers from the prompt source: drop backend=server")
    if stage == "generate" and cfg.backend == "server" and not cfg.server.url:
        raise DSparkError("backend=server needs server.url=http://<host>:<port> (an OpenAI-compatible server)")
    if stage == "bench" and cfg.prompt_lookup.min_ngram > cfg.prompt_lookup.max_ngram:
        raise DSparkError(f"prompt_lookup.min_ngram={cfg.prompt_lookup.min_ngram} > prompt_lookup.max_ngram="
                          f"{cfg.prompt_lookup.max_ngram}: make min_ngram <= max_ngram")


def check_output_dir(path) -> None:
    """output_dir must be a folder, or creatable: the nearest existing ancestor a writable folder."""
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise DSparkError(f"output_dir '{p}' is an existing file: pass output_dir=<folder>")
    base = next(q for q in (p, *p.parents) if q.exists())
    # access(2), not a probe file: writing one would change the folder (its mtime); it also reports a
    # read-only filesystem for root
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise DSparkError(f"output_dir '{p}' cannot be written ('{base}' is not a writable folder): "
                          "pass output_dir=<writable folder>")
