"""Shared fixtures: the tiny fp32 target (built locally, no network) and offline settings."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_target_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.load(os.path.join(REPO, "conf", "target", "tiny.yaml"))


@pytest.fixture(scope="session")
def tiny_target():
    from dspark.models.target import load_target

    return load_target(tiny_target_cfg())


@pytest.fixture(scope="session")
def tiny_prompts(tiny_target):
    """Three chat prompts of clearly different lengths (ragged batch)."""
    texts = ["hi", "Write a function that adds two numbers, then explain it.",
             "def fib(n):\n    # return the n-th Fibonacci number\n"]
    return [tiny_target.encode_chat(t) for t in texts]
