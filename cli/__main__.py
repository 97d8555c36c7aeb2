"""`dspark <stage> [hydra overrides]`: one command, one subcommand per pipeline stage."""
from __future__ import annotations

import importlib
import sys

STAGES = {
    "generate": ("dspark.generate", "regenerate answers to prompts with the frozen target (training data)"),
    "train": ("dspark.train.__main__", "train a draft head on the self-distilled data (accelerate)"),
    "calibrate": ("dspark.calibrate", "fit per-position confidence temperatures (STS) on held-out data"),
    "bench": ("dspark.bench", "measure speedup, tau and acceptance of every method side by side"),
    "export": ("dspark.export", "write a Hub-ready head folder (and push it)"),
    "run": ("dspark.run", "the whole pipeline: generate -> train -> calibrate -> bench -> export"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {doc}" for name, (_, doc) in STAGES.items())
    return ("usage: dspark <stage> [key=value ...] [--multirun] [--help]\n\n"
            f"stages:\n{rows}\n\n"
            "Everything after the stage is Hydra overrides, e.g. `dspark bench target=tiny`.\n"
            "`dspark <stage> --help` shows that stage's configuration.")


def _groups() -> set[str]:
    from importlib.resources import files

    return {p.name for p in files("dspark.conf").iterdir() if p.is_dir() and not p.name.startswith("_")}


def unknown_group_choice(overrides: list[str]) -> str | None:
    """Hydra lists a missing config-group option over many lines; say it in one."""
    from importlib.resources import files

    conf = files("dspark.conf")
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if not eq or key not in _groups() or "," in value:
            continue
        options = sorted(p.name[:-5] for p in conf.joinpath(key).iterdir() if p.name.endswith(".yaml"))
        if value not in options:
            return f"unknown {key} '{value}': choose one of {', '.join(options)}"
    return None


def unknown_setting(stage: str, overrides: list[str]) -> str | None:
    """A key the stage's config does not have (a typo Hydra would reject in six lines, or a `+key` that
    it would accept and nobody would read): one line naming it and the nearest existing keys."""
    import difflib

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from .settings import PIPELINE

    groups = _groups()
    pairs = [(o, o.partition("=")[0]) for o in overrides if "=" in o and not o.startswith("-")]
    chosen = [o for o, k in pairs if k.lstrip("+~") in groups and "," not in o]
    try:
        with initialize_config_module("dspark.conf", version_base="1.3"):
            cfg = compose(stage, overrides=chosen)
    except Exception:   # noqa: BLE001 - Hydra reports its own composition errors after this
        return None
    known = _keys(OmegaConf.to_container(cfg, resolve=False))
    for o, key in pairs:
        bare = key.lstrip("+~")
        if bare in groups or bare.split(".")[0] == "hydra" or "@" in bare:
            continue
        parent, _, leaf = bare.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False) if parent else cfg
        there = OmegaConf.is_dict(node) and leaf in list(node.keys())   # `in` misses ??? values
        if there and key.startswith("+"):
            return f"{bare} already exists: write {bare}=… without the +"
        if there or key.startswith("~"):
            continue
        if stage == "run" and key.startswith("+") and bare.split(".")[0] in PIPELINE:
            continue   # a stage's own key, checked when dspark run composes that stage
        near = difflib.get_close_matches(bare, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        section = (" (keys a section of conf/run.yaml does not list take +, e.g. +train.optim.lr=3e-4)"
                   if stage == "run" and "." in bare else "")
        return f"unknown setting '{bare}': {hint}`dspark {stage} --help` lists every setting{section}"
    return None


def _keys(tree, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage = argv[0]
    if stage not in STAGES:
        print(f"dspark: error: unknown stage '{stage}'; choose one of {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(STAGES[stage][0])
    bad = unknown_group_choice(argv[1:]) or unknown_setting(stage, argv[1:])
    if bad:
        print(f"dspark {stage}: error: {bad}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"dspark {stage}"] + argv[1:]
    module.main()


if __name__ == "__main__":
    main()
