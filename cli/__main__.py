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


def unknown_group_choice(overrides: list[str]) -> str | None:
    """Hydra lists a missing config-group option over many lines; say it in one."""
    from importlib.resources import files

    conf = files("dspark.conf")
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if not eq or "." in key or "," in value or not conf.joinpath(key).is_dir():
            continue
        options = sorted(p.name[:-5] for p in conf.joinpath(key).iterdir() if p.name.endswith(".yaml"))
        if value not in options:
            return f"unknown {key} '{value}': choose one of {', '.join(options)}"
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage = argv[0]
    if stage not in STAGES:
        print(f"dspark: error: unknown stage '{stage}'; choose one of {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    try:
        module = importlib.import_module(STAGES[stage][0])
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("dspark"):
            raise
        print(f"dspark: error: stage '{stage}' is not built yet in this version", file=sys.stderr)
        sys.exit(2)
    bad = unknown_group_choice(argv[1:])
    if bad:
        print(f"dspark {stage}: error: {bad}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"dspark {stage}"] + argv[1:]
    module.main()


if __name__ == "__main__":
    main()
