"""Serving layouts: a trained head written in the formats serving engines load.

- `speculators_layout` / `write_speculators`: a DSpark/DFlash head in the vLLM `speculators` format;
- `save_eagle3_layout`: an EAGLE-3 head in the layout vLLM and SGLang load for EAGLE-3 drafts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark.core.errors import DSparkError
from dspark.models.eagle3 import Eagle3Draft


# ---------------------------------------------------------------------------------------------------
# vLLM speculators layout
#
# vLLM loads draft models written in the `speculators` format (github.com/vllm-project/speculators):
# a config.json whose `speculators_model_type` names the algorithm, a `transformer_layer_config`
# describing the draft's decoder layers (a transformers config dict), a `speculators_config` with the
# proposal methods and the verifier (target), and a model.safetensors with the draft's own weights.
# DFlash checkpoints in that format use `fc` (concatenated target features → hidden), `hidden_norm`,
# Llama-named `layers.N.*`, a final `norm`, `block_size` and the ids of the target layers whose
# outputs are fused. A DSpark head is a DFlash backbone plus a sequential (Markov or RNN) head and a
# confidence head, so we write the DFlash fields and add what DSpark needs beside them.
#
# Config fields (ours → speculators layout):
#   architectures                    → ["DSparkDraftModel"] (["DFlashDraftModel"] for sequential_head=none)
#   (kind)                           → speculators_model_type "dspark" | "dflash"
#   num_layers                       → transformer_layer_config.num_hidden_layers
#   target_hidden_size               → transformer_layer_config.hidden_size and target_hidden_size
#   num_attention_heads, num_key_value_heads, intermediate_size, rms_norm_eps, rope_theta
#                                    → transformer_layer_config.* (same names); head_dim = hidden / heads;
#                                      model_type "llama", hidden_act "silu", no biases (our layers are
#                                      Llama-shaped, without Qwen3's q/k norms)
#   target_vocab_size                → transformer_layer_config.vocab_size
#   draft_vocab_size                 → draft_vocab_size
#   gamma                            → block_size and proposal_methods[0].speculative_tokens. Caution: a
#                                      DFlash block of size B drafts B−1 tokens (its anchor position's
#                                      output is unused); a DSpark block of γ positions drafts γ tokens
#                                      (output i predicts anchor+1+i).
#   target_layer_ids (hidden_states indices: 0 = embeddings, i = output of decoder layer i−1)
#                                    → aux_hidden_state_layer_ids = [i − 1 …] (decoder-layer indices)
#   target_name_or_path, target_revision, target
#                                    → speculators_config.verifier.name_or_path (+ revision)
#   sequential_head, head_rank, confidence_temperatures
#                                    → dspark_config.* (no speculators counterpart yet)
#   (learned mask embedding)         → mask_token_id null: DFlash embeds a mask token of the target
#                                      vocabulary; we train a free vector, shipped as `mask_embedding`
#
# Weights (ours → speculators layout; the target's embedding and LM head are shared, never stored):
#   context_proj.weight → fc.weight              context_norm.weight → hidden_norm.weight
#   layers.N.*          → layers.N.* (q/k/v/o_proj, gate/up/down_proj, input/post_attention_layernorm)
#   norm.weight         → norm.weight            mask_embedding      → mask_embedding
#   token_embed.weight  → <kind>_head.token_embed.weight   (W1, rank r; last row = "outside the draft vocab")
#   chunk_head.*        → <kind>_head.* (Markov: up_proj = W2; RNN: in_proj, up_proj), kind = markov | rnn
#   confidence.*        → confidence_head.*
#   d2t (draft id → target id) → d2t as offsets (target id − draft id) and t2d (bool mask over the
#                                target vocabulary), the Eagle-3 speculators convention
#
# Untested: no GPU and no vLLM here. vLLM ships no DSpark proposer, and its DFlash proposer would
# read this folder as a DFlash drafter at best (ignoring the sequential and confidence heads and the
# learned mask embedding), so treat this layout as a documented starting point, not a working path.
# ---------------------------------------------------------------------------------------------------

def speculators_layout(head, verifier: str, verifier_architectures: list[str] | None = None,
                       revision: str | None = None, dtype=None) -> tuple[dict, dict]:
    """(config.json dict, state dict) of `head` (a DSparkDraft) in the speculators layout above."""
    import torch

    c = head.config
    kind = c.kind
    seq = c.sequential_head
    rename = {"context_proj.": "fc.", "context_norm.": "hidden_norm.", "confidence.": "confidence_head.",
              "token_embed.": f"{seq}_head.token_embed.", "chunk_head.": f"{seq}_head."}
    state = {}
    for k, v in head.state_dict().items():
        if k == "d2t":
            state["d2t"] = (v - torch.arange(len(v), device=v.device)).long().contiguous()
            t2d = torch.zeros(c.target_vocab_size, dtype=torch.bool)
            t2d[v.cpu()] = True
            state["t2d"] = t2d
            continue
        new = next((n + k[len(o):] for o, n in rename.items() if k.startswith(o)), k)
        state[new] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    verifier_cfg = {"name_or_path": verifier, "architectures": list(verifier_architectures or [])}
    if revision:
        verifier_cfg["revision"] = revision
    config = {
        "architectures": ["DFlashDraftModel" if kind == "dflash" else "DSparkDraftModel"],
        "speculators_model_type": kind,
        "transformer_layer_config": {
            "model_type": "llama", "hidden_size": c.target_hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "attention_bias": False,
            "mlp_bias": False, "vocab_size": c.target_vocab_size,
        },
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "block_size": c.gamma,
        "aux_hidden_state_layer_ids": [int(i) - 1 for i in c.target_layer_ids],
        "mask_token_id": None,
        "dspark_config": {"sequential_head": seq, "head_rank": c.head_rank,
                          "confidence_temperatures": list(c.confidence_temperatures),
                          "target_layer_ids_hidden_states": list(c.target_layer_ids),
                          "mask_embedding": "learned vector in the weights as `mask_embedding`"},
        "speculators_config": {
            "algorithm": kind,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.gamma,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": verifier_cfg,
        },
        "torch_dtype": str(dtype or torch.float32).replace("torch.", ""),
    }
    return config, state


def save_eagle3_layout(head: Eagle3Draft, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                       include_embedding: bool = False) -> None:
    """Write an attached head in the EAGLE-3 checkpoint layout that vLLM and SGLang load
    (`speculative_config={"method": "eagle3", "model": folder}`). UNTESTED in vLLM/SGLang (neither
    runs on this machine): the layout follows their published EAGLE-3 checkpoints.

    config.json                              ← Eagle3Config
      architectures: ["LlamaForCausalLMEagle3"]   (our `Eagle3Draft`)
      model_type: "llama", num_hidden_layers: 1, hidden_act: "silu", tie_word_embeddings: false
      hidden_size, target_hidden_size        ← target_hidden_size
      num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta
      vocab_size                             ← target_vocab_size
      draft_vocab_size                       ← draft_vocab_size
      eagle_config.eagle_aux_hidden_state_layer_ids ← target_layer_ids (HF hidden_states index i = the
                                               input of decoder layer i, which is what vLLM captures)
    model.safetensors                        ← state dict
      fc.weight (D, k·D)                     ← fc.weight
      midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight, midlayer.self_attn.
      {q,k,v}_proj.weight (·, 2D), o_proj, midlayer.mlp.{gate,up,down}_proj.weight ← same names
      norm.weight                            ← norm.weight
      lm_head.weight (Vd, D)                 ← the target's LM-head rows d2t (shared at train time)
      d2t (Vd,) int64 OFFSETS: target id = i + d2t[i]   ← our d2t[i] − i
      t2d (V,) bool: token is in the draft vocabulary  ← derived from d2t
      embed_tokens.weight (V, D)             ← the target's embedding, only with include_embedding
                                               (engines otherwise share the target's)
    Input order inside the layer is [input_layernorm(embedding) ; hidden_norm(feature)], as theirs."""
    c = head.config
    if head.lm_weight.numel() == 0:
        raise DSparkError("attach the target first (head.attach(target)): the layout needs its LM-head rows")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in head.state_dict().items() if k != "d2t"}
    state["lm_head.weight"] = head.lm_weight.to(dtype).contiguous()
    if include_embedding:
        state["embed_tokens.weight"] = head.embed_weight.to(dtype).contiguous()
    d2t = head.d2t.cpu()
    state["d2t"] = (d2t - torch.arange(c.draft_vocab_size)).contiguous()
    t2d = torch.zeros(c.target_vocab_size, dtype=torch.bool)
    t2d[d2t] = True
    state["t2d"] = t2d
    save_file({k: v.cpu() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": c.target_hidden_size, "target_hidden_size": c.target_hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": 32768,
        "vocab_size": c.target_vocab_size, "draft_vocab_size": c.draft_vocab_size, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.target_layer_ids), "use_aux_hidden_state": True},
        "dspark_target": c.target,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_speculators(head, folder: Path, target: dict, dtype: torch.dtype) -> dict:
    """`speculators_layout` of `head` written into a new `folder`; returns its config."""
    config, state = speculators_layout(head, target["id"] or target["name"], target["architectures"],
                                       target["revision"], dtype)
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


# The serving layout `dspark export` writes into vllm/, by head architecture (the key of models/heads.py
# HEADS). EAGLE-3 has none here: save_eagle3_layout needs the target's LM head, which export never loads.
LAYOUTS = {"dspark": write_speculators}
