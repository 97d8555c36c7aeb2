"""Optional compact feature cache: the target's hidden states for every generated row, so training can
skip the target forward.

Per chunk file `chunks/chunk-<id>.jsonl` one `features/chunk-<id>.safetensors` (bf16) holds, per row,
`<prompt_id>.layers` (n_tokens, k·H: the hidden states at `feature_layers`, concatenated) and
`<prompt_id>.last` (n_tokens, H: the final, normed hidden state; the frozen LM head turns it back into
the target's logits, so full-vocabulary logits are never stored). Disk: (k + 1)·H·2 bytes per token —
6.9 KB/token for SmolLM2-135M with k = 5 (H = 576).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dspark.models.dspark import default_layer_ids
from dspark.core.errors import DSparkError


@torch.no_grad()
def row_features(target, input_ids: list[int], layers) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's cache entries: (n_tokens, k·H) features at `layers` and (n_tokens, H) final state."""
    feats, last = target.features(torch.tensor([input_ids], device=target.device), layers)
    return feats[0], last[0]


def check_layers(target, layers) -> list[int]:
    """The validated layer ids; None means the draft heads' default (`default_layer_ids`)."""
    if layers is None:
        return default_layer_ids(target.num_layers)
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i <= target.num_layers]
    if bad or not layers:
        raise DSparkError(f"feature_layers {bad or layers} out of range for target '{target.name}' with "
                          f"{target.num_layers} layers: use indices 0..{target.num_layers}")
    return layers


def cache_features(target, layers, chunks: Path, out: Path, rank: int = 0, world: int = 1) -> None:
    layers = check_layers(target, layers)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(chunks.glob("chunk-*.jsonl"))[rank::world]
    todo = [f for f in files if not (out / f"{f.stem}.safetensors").is_file()]
    for f in tqdm(todo, desc="features", unit="chunk", disable=not todo):
        tensors = {}
        for line in f.read_text().splitlines():
            row = json.loads(line)
            feats, last = row_features(target, row["input_ids"], layers)
            tensors[f"{row['prompt_id']}.layers"] = feats.to(torch.bfloat16).contiguous().cpu()
            tensors[f"{row['prompt_id']}.last"] = last.to(torch.bfloat16).contiguous().cpu()
        tmp = out / f".{f.stem}.tmp"
        save_file(tensors, str(tmp), metadata={"layers": json.dumps(layers), "target": target.name})
        os.replace(tmp, out / f"{f.stem}.safetensors")
