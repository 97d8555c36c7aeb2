"""Shared fixtures: the tiny fp32 target (built locally, no network) and offline settings."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

torch.set_flush_denormal(True)   # as the dspark CLI does (cli/guard.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compose_cfg(name, *overrides):
    """A stage's Hydra config, composed as the CLI composes it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("dspark.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def tiny_target_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.load(os.path.join(REPO, "conf", "target", "tiny.yaml"))


@pytest.fixture(scope="session")
def tiny_target():
    from dspark.models.target import load_target

    return load_target(tiny_target_cfg())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A 12-prompt self-distilled dataset from the tiny target (read-only for the tests)."""
    from dspark.data.generate import run as generate

    out = tmp_path_factory.mktemp("gen")
    generate(compose_cfg("generate", "target=tiny", f"output_dir={out}", "max_prompts=12", "max_new_tokens=48",
                         "heldout_fraction=0"))
    return str(out / "dataset")


@pytest.fixture(scope="session")
def tiny_prompts(tiny_target):
    """Three chat prompts of clearly different lengths (ragged batch)."""
    texts = ["hi", "Write a function that adds two numbers, then explain it.",
             "def fib(n):\n    # return the n-th Fibonacci number\n"]
    return [tiny_target.encode_chat(t) for t in texts]


def tiny_head(target, sequential_head="markov", draft_vocab=None, seed=0, **over):
    """A randomly initialised draft head for the tiny target (optionally with a reduced vocabulary), in
    the serving-compatible architecture new heads train with (q/k norm, mask = a target token's
    embedding); `qk_norm=False, mask_token_id=-1` gives a head trained before it."""
    over = {"qk_norm": True, "mask_token_id": target.spare_token_id(), **over}
    import torch

    from dspark.models.dspark import DSparkConfig, DSparkDraft, default_layer_ids

    torch.manual_seed(seed)
    d2t = None if draft_vocab is None else torch.randperm(target.vocab_size)[:draft_vocab].sort().values
    cfg = DSparkConfig(target=target.name, target_hidden_size=target.hidden_size,
                       target_vocab_size=target.vocab_size, target_num_layers=target.num_layers,
                       target_layer_ids=default_layer_ids(target.num_layers), num_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, gamma=5,
                       sequential_head=sequential_head, head_rank=8, draft_vocab_size=draft_vocab or 0, **over)
    head = DSparkDraft(cfg, d2t)
    if sequential_head != "none":   # make the sequential head matter in tests
        torch.nn.init.normal_(head.chunk_head.up_proj.weight, std=0.5)
    return head.attach(target)


def has_compiler() -> bool:
    """torch.compile on CPU (draft_compile) builds C++ kernels: a C++ compiler must be on the machine."""
    from dspark.inference.compiled_head import has_cpp_compiler
    return has_cpp_compiler()
