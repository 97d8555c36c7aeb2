"""One exception type for bad input, and the guard that turns it into one clear error line."""
from __future__ import annotations

import os
import sys


class DSparkError(Exception):
    """A user-facing error. The message names the problem and the fix."""


def guarded(stage: str, run, cfg):
    """Call a stage's `run(cfg)`; on bad input print one line and exit 2 (traceback only with
    HYDRA_FULL_ERROR=1), removing the output folder if the failed run left it empty."""
    _per_job_output_dir(cfg)
    import torch

    torch.set_flush_denormal(True)   # denormal floats slow fp32 CPU kernels by an order of magnitude
    try:
        return run(cfg)
    except DSparkError as e:
        out = cfg.get("output_dir") if hasattr(cfg, "get") else None
        if out and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dspark {stage}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


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
