"""Hugging Face Hub I/O for draft heads: resolve a head reference, plan and push an upload.

A head reference is a local folder or a Hub repo id (`user/name`, optionally `user/name@revision`).
`resolve_head` is the one code path for both: an existing folder is returned as it is, anything
else must be a valid repo id and is fetched with `huggingface_hub.snapshot_download` (only the
files a head consists of). Offline (`HF_HUB_OFFLINE=1`) that reads the local Hub cache and fails
with one clear error when the head is not there.

Pushing uses `HfApi().upload_folder`. The token is whatever `huggingface_hub` finds (`HF_TOKEN` or
the `hf auth login` cache); this module never reads, prints or stores it.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import DSparkError

# Files that make up a head; a download fetches nothing else (no training state exists in an export).
HEAD_FILES = ["config.json", "model.safetensors", "README.md", "vllm/*"]
# The file `dspark export` marks its own folders with (eval/export.py); it never goes to the Hub.
EXPORT_MARKER = ".dspark-export"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^({_NAME})/({_NAME})$")


def validate_repo_id(repo_id: str) -> str:
    """`user/name` with Hub-legal characters (letters, digits, '-', '_', '.'; no leading/trailing
    '-' or '.', no '--' or '..', at most 96 characters per part). Returns it; raises DSparkError."""
    rid = str(repo_id or "").strip()
    m = _REPO_ID.match(rid)
    if not m or any(len(p) > 96 or "--" in p or ".." in p for p in m.groups()) or rid.endswith(".git"):
        raise DSparkError(f"repo id '{repo_id}' is not valid: use <user or org>/<name> with letters, digits, "
                          "'-', '_' and '.' (e.g. repo_id=alice/smollm2-135m-dspark)")
    return rid


def split_ref(ref: str) -> tuple[str, str | None]:
    """'user/name@rev' → ('user/name', 'rev'); without '@' the revision is None."""
    rid, _, rev = str(ref).partition("@")
    return rid, (rev or None)


def is_repo_ref(ref) -> bool:
    """Whether `ref` reads as a Hub repo id (`user/name[@rev]`) rather than a path."""
    return bool(_REPO_ID.match(split_ref(str(ref))[0])) and not str(ref).startswith((".", "/", "~"))


def resolve_head(ref: str | Path, revision: str | None = None) -> Path:
    """A local folder holding the head `ref` names: `ref` itself when it is a folder, else the Hub
    snapshot of repo id `ref` (at `revision` or the `@rev` suffix)."""
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        return path
    rid, rev = split_ref(str(ref))
    if not _REPO_ID.match(rid):
        raise DSparkError(f"head '{ref}' is neither a folder nor a Hub repo id (user/name): "
                          "run `dspark train` first or pass head=<folder or user/name>")
    validate_repo_id(rid)
    return Path(_download(rid, revision or rev))


def _download(repo_id: str, revision: str | None) -> str:
    """Fetch a head repo's files into the Hub cache; the one place that touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HEAD_FILES)
    except LocalEntryNotFoundError:
        raise DSparkError(f"head '{repo_id}' is not a local folder, nor in the local Hub cache, and the Hub is "
                          "unreachable or offline (HF_HUB_OFFLINE=1): check the path or connect once") from None
    except HfHubHTTPError as e:
        raise DSparkError(f"cannot download head '{repo_id}' from the Hub: {str(e).splitlines()[0]}") from None


def upload_plan(folder: str | Path) -> list[dict]:
    """Exactly what `push_folder` uploads: every file under `folder` but the export marker, relative
    path and size."""
    root = Path(folder)
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p != root / EXPORT_MARKER]


def push_folder(folder: str | Path, repo_id: str, private: bool = False,
                commit_message: str = "Upload DSpark draft head") -> str:
    """Create `repo_id` if needed and upload `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = validate_repo_id(repo_id)
    api = HfApi()
    try:
        api.whoami()
    except Exception:   # no token, an expired one, or no network: say which fix applies, never the token
        raise DSparkError("not logged in to the Hugging Face Hub (or it is unreachable): run `hf auth login` "
                          "or set HF_TOKEN, then retry") from None
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                          ignore_patterns=[EXPORT_MARKER])
    except HfHubHTTPError as e:
        raise DSparkError(f"upload to '{repo_id}' failed: {str(e).splitlines()[0]}") from None
    return str(url)


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
