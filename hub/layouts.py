"""Serving layouts: a trained head rewritten in the formats serving engines load.

`dspark export vllm=true` writes `vllm/`: the head in the `speculators` format
(github.com/vllm-project/speculators), which vLLM loads and SGLang's DSpark drafter reads. EAGLE-3
heads also get `sglang/`, the LlamaForCausalLMEagle3 layout SGLang loads for EAGLE-3 drafts.
`tests/test_speculators.py` loads `vllm/` into the real speculators package (pinned to
SPECULATORS_VERSION) and checks a strict key match and equal logits and greedy drafts; vLLM and SGLang
themselves were not run (docs/serving.md).

A speculators folder is a config.json (the pydantic discriminator `speculators_model_type`, a
`transformer_layer_config` for the draft's decoder layers, a `speculators_config` naming the
verifier = our target) and a model.safetensors with the draft's own weights. The target's embedding
is never stored for DSpark (speculators always reloads it from the verifier); the LM-head rows of a
reduced draft vocabulary are (it cannot derive them).

DSpark/DFlash (`DSparkDraft` → speculators `DSparkDraftModel`):
  kind dspark | dflash          → speculators_model_type "dspark"; DFlash (sequential_head none) as
                                  markov_rank 0, confidence_head_with_markov false
  gamma                         → block_size and speculative_tokens; sample_from_anchor true (output i
                                  of the block at anchor n predicts x_{n+1+i}, γ drafts per block)
  target_layer_ids              → aux_hidden_state_layer_ids, unchanged (hidden_states indices)
  mask_token_id                 → mask_token_id (the mask input is the target's embedding of it)
  head_rank, markov             → markov_rank, markov_head_type "vanilla"
  confidence_temperatures       → dspark_confidence_temperatures (extra key: speculators keeps it
                                  but has no STS; its confidences are the raw sigmoid)
  context_proj / context_norm   → fc / hidden_norm
  layers.N.* (incl. q/k_norm), norm → same names (Qwen3-shaped layers: model_type "qwen3")
  token_embed (Vd + 1, r)       → markov_head.markov_w1 (V, r) = token_embed[t2d]: W1 over the whole
                                  target vocabulary, tokens outside the draft vocabulary on our
                                  "outside" row
  chunk_head.up_proj (Vd, r)    → markov_head.markov_w2
  confidence                    → confidence_head.proj
  (target LM head)              → lm_head (Vd, D) = its rows d2t, only when Vd < V
  d2t (draft → target id)       → d2t offsets (target = i + d2t[i]) and t2d bool, only when Vd < V
Heads the format cannot express exactly are refused (`dspark_refusals`).

EAGLE-3 (`Eagle3Draft` → speculators `Eagle3DraftModel`, Llama layer without q/k norm):
  target_layer_ids → eagle_aux_hidden_state_layer_ids; midlayer.* → layers.0.*; fc, norm same;
  embed_tokens and lm_head always stored (speculators 0.9.0 leaves them uninitialised otherwise:
  it only fills NaN weights from the verifier, but a missing checkpoint key is not NaN);
  norm_before_residual / norm_before_fc / fc_norm / norm_output all false.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors.torch import save_file

from dspark.core.errors import DSparkError

SPECULATORS_VERSION = "0.9.0"   # the version these layouts are tested against (Makefile pin)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()


def vocabulary_state(head, lm_head: bool) -> dict:
    """d2t as offsets and t2d as a mask when the draft vocabulary is reduced, and the target's LM-head
    rows of the draft vocabulary (`lm_head`: always, else only when reduced). The head must be attached."""
    c = head.config
    state = {"lm_head.weight": head.lm_weight} if lm_head or c.draft_vocab_size < c.target_vocab_size else {}
    if c.draft_vocab_size < c.target_vocab_size:
        d2t = head.d2t.cpu()
        state["d2t"] = d2t - torch.arange(c.draft_vocab_size)
        state["t2d"] = torch.zeros(c.target_vocab_size, dtype=torch.bool).index_fill_(0, d2t, True)
    return state


def vocabulary_refusals(head) -> list[str]:
    d2t = head.d2t
    if len(d2t) > 1 and not bool((d2t[1:] > d2t[:-1]).all()):
        return ["its draft vocabulary is not in ascending target-id order (speculators' d2t/t2d assume it)"]
    return []


def dspark_refusals(head) -> list[str]:
    """Why `head` (a DSparkDraft) has no exact speculators DSpark equivalent; empty when it has one."""
    c = head.config
    return vocabulary_refusals(head) + architecture_refusals(c.sequential_head, c.qk_norm, c.mask_token_id)


def architecture_refusals(sequential_head: str, qk_norm: bool, mask_token_id) -> list[str]:
    """The DSpark architecture choices speculators cannot express (mask_token_id: an id, −1 or None for
    a learned vector, or "auto"); `dspark run` checks its draft settings with it before any work."""
    why = []
    if sequential_head == "rnn":
        why.append("its RNN sequential head is a different recurrence from speculators' `rnn` Markov head")
    if not qk_norm:
        why.append("it was trained without per-head q/k RMSNorm (qk_norm: false), which speculators' "
                   "DSpark layers always apply")
    if mask_token_id is None or mask_token_id != "auto" and int(mask_token_id) < 0:
        why.append("its mask input is a learned vector (mask_token_id: -1); speculators embeds mask "
                   "positions with the target's frozen embedding of mask_token_id")
    return why


def check_dspark(head) -> None:
    refuse(head, dspark_refusals(head))


def check_eagle3(head) -> None:
    refuse(head, vocabulary_refusals(head))


def refuse(head, why: list[str]) -> None:
    """One DSparkError naming every reason and the fix, when there is a reason."""
    if why:
        raise DSparkError(f"this {head.config.kind} head cannot be written in the speculators layout "
                          f"exactly: {'; '.join(why)}. Export it with vllm=false, or retrain it with the "
                          "conf/draft defaults (qk_norm: true, mask_token_id: auto, sequential_head "
                          "markov or none)")


def layer_config(c, model_type: str, num_layers: int, target: dict) -> dict:
    """The `transformer_layer_config` of a head config (head_dim explicit: speculators' Qwen3
    default is 128, and its EAGLE-3 rotary would otherwise derive it from twice the width)."""
    return {"model_type": model_type, "vocab_size": c.target_vocab_size, "hidden_size": c.target_hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": num_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "attention_bias": False,
            "max_position_embeddings": int(target.get("max_position_embeddings") or 32768),
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}


def speculators_config(c, algorithm: str, target: dict, dtype: torch.dtype) -> dict:
    """The keys every speculators config.json carries (the verifier is the head's target)."""
    verifier = {"name_or_path": target["id"] or target["name"], "architectures": list(target["architectures"])}
    if target.get("revision"):
        verifier["revision"] = target["revision"]   # informational: speculators drops unknown keys
    return {"speculators_model_type": algorithm, "speculators_version": SPECULATORS_VERSION,
            "draft_vocab_size": c.draft_vocab_size, "target_hidden_size": c.target_hidden_size,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "speculators_config": {"algorithm": algorithm, "default_proposal_method": "greedy",
                                   "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.gamma,
                                                         "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                                   "verifier": verifier}}


def dspark_layout(head, target: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(config.json, state dict) of an attached DSparkDraft in the speculators DSpark layout."""
    check_dspark(head)
    c = head.config
    markov = c.sequential_head == "markov"
    rename = {"context_proj.": "fc.", "context_norm.": "hidden_norm.", "confidence.": "confidence_head.proj.",
              "chunk_head.up_proj.": "markov_head.markov_w2."}
    state = {next((n + k[len(o):] for o, n in rename.items() if k.startswith(o)), k): v
             for k, v in head.state_dict().items() if k not in ("d2t", "token_embed.weight")}
    if markov:
        state["markov_head.markov_w1.weight"] = head.token_embed.weight[head.t2d]   # (V, r)
    state.update(vocabulary_state(head, lm_head=False))
    config = {"architectures": ["DSparkSpeculator"], **speculators_config(c, "dspark", target, dtype),
              "transformer_layer_config": layer_config(c, "qwen3", c.num_layers, target),
              "block_size": c.gamma, "aux_hidden_state_layer_ids": list(c.target_layer_ids),
              "mask_token_id": c.mask_token_id, "sample_from_anchor": True, "sliding_window_non_causal": False,
              "markov_rank": c.head_rank if markov else 0, "markov_head_type": "vanilla",
              "enable_confidence_head": True, "confidence_head_with_markov": markov,
              "dspark_confidence_temperatures": list(c.confidence_temperatures)}
    return config, {k: _cast(v, dtype) for k, v in state.items()}


def eagle3_layout(head, target: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(config.json, state dict) of an attached Eagle3Draft in the speculators EAGLE-3 layout."""
    check_eagle3(head)
    c = head.config
    state = {k.replace("midlayer.", "layers.0.", 1): v for k, v in head.state_dict().items() if k != "d2t"}
    state["embed_tokens.weight"] = head.embed_weight
    state.update(vocabulary_state(head, lm_head=True))
    config = {"architectures": ["Eagle3Speculator"], **speculators_config(c, "eagle3", target, dtype),
              "transformer_layer_config": layer_config(c, "llama", 1, target),
              "eagle_aux_hidden_state_layer_ids": list(c.target_layer_ids), "norm_before_residual": False,
              "norm_before_fc": False, "fc_norm": False, "norm_output": False}
    return config, {k: _cast(v, dtype) for k, v in state.items()}


def sglang_eagle3_layout(head, target: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(config.json, state dict) of an attached Eagle3Draft in the layout SGLang loads for EAGLE-3
    drafts (`--speculative-algorithm EAGLE3`, as its published LlamaForCausalLMEagle3 checkpoints):
    a flat Llama config with `draft_vocab_size` and `eagle_config`, weights `fc`, `midlayer.*`
    (q/k/v read the 2·D-wide [embedding ; feature]), `norm`, `lm_head` (Vd rows) and d2t/t2d as in
    speculators. The embedding is the target's, shared by SGLang at run time. Never loaded here."""
    c = head.config
    state = {k: v for k, v in head.state_dict().items() if k != "d2t"}
    state.update(vocabulary_state(head, lm_head=True))
    layer = layer_config(c, "llama", 1, target)
    config = {"architectures": ["LlamaForCausalLMEagle3"], **{k: v for k, v in layer.items() if k != "rope_parameters"},
              "rope_theta": c.rope_theta, "target_hidden_size": c.target_hidden_size, "tie_word_embeddings": False,
              "draft_vocab_size": c.draft_vocab_size, "torch_dtype": str(dtype).removeprefix("torch."),
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.target_layer_ids),
                               "use_aux_hidden_state": True}}
    return config, {k: _cast(v, dtype) for k, v in state.items()}


def save_layout(folder: Path, config: dict, state: dict) -> None:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_dspark(head, folder: Path, target: dict, dtype: torch.dtype) -> dict:
    """`vllm/` of an export folder; returns its config."""
    config, state = dspark_layout(head, target, dtype)
    save_layout(folder / "vllm", config, state)
    return config


def write_eagle3(head, folder: Path, target: dict, dtype: torch.dtype) -> dict:
    """`vllm/` (speculators) and `sglang/` of an export folder; returns the speculators config."""
    config, state = eagle3_layout(head, target, dtype)
    save_layout(folder / "vllm", config, state)
    save_layout(folder / "sglang", *sglang_eagle3_layout(head, target, dtype))
    return config


class Layout(NamedTuple):
    """A head kind's serving layout. `check(head)` raises DSparkError when the head cannot be written
    exactly (export calls it before loading the target); `write(attached head, export folder, target
    identity, dtype)` writes the serving folders and returns the speculators config."""

    check: Callable
    write: Callable


# The serving layouts `dspark export vllm=true` writes, by head architecture (the keys of models/heads.py HEADS).
LAYOUTS = {"dspark": Layout(check_dspark, write_dspark), "eagle3": Layout(check_eagle3, write_eagle3)}
