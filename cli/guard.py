"""The guard every stage runs under: settings checked before any work, and bad input turned into one
clear error line with exit status 2."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dspark.core.errors import DSparkError

from .settings import check


def guarded(stage: str, run, cfg):
    """Check `cfg` (settings.py), then call the stage's `run(cfg)`. On bad input print one line and
    exit 2 (traceback only with HYDRA_FULL_ERROR=1); an output folder this call created and left
    without files is removed, and nothing that existed before is touched."""
    _per_job_output_dir(cfg)
    import torch

    torch.set_flush_denormal(True)   # denormal floats slow fp32 CPU kernels by an order of magnitude
    out = Path(str(cfg.output_dir)).expanduser() if cfg.get("output_dir") else None
    existed = out is None or out.exists()
    try:
        check(stage, cfg)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        return run(cfg)
    except DSparkError as e:
        if not existed:
            _remove_if_no_files(out)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dspark {stage}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _remove_if_no_files(folder: Path) -> None:
    """Remove a folder tree made of empty folders only (bottom-up); leave it when any file is inside."""
    if not folder.is_dir() or any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        return
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    folder.rmdir()


def _per_job_output_dir(cfg) -> None:
    """Under `--multirun` each job writes into its own sweep subfolder of output_dir (its inputs,
    resolved first, still come from output_dir itself)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import open_dict

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return
    if hc.mode == RunMode.MULTIRUN:
        from omegaconf import OmegaConf

        OmegaConf.resolve(cfg)   # inputs such as ${output_dir}/dataset keep pointing at the sweep root
        with open_dict(cfg):
            cfg.output_dir = hc.runtime.output_dir
