"""What every draft head shares: the draft vocabulary map (d2t / t2d), the target's frozen embedding
and LM head attached at run time, and Hugging Face style I/O — `config.json` (architecture + config
dataclass) and `model.safetensors`, loaded strictly with one clear error per kind of damage."""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dspark.core.errors import DSparkError


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "list": (list,), "bool": (bool,)}


def config_from_dict(cls, d: dict, what: str):
    """A head config dataclass from config.json: unknown keys and values of the wrong type are one clear
    error each (`"gamma": "seven"` names gamma), before any tensor is built."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known) - {"architectures"})
    if unknown:
        raise DSparkError(f"{what} config has unknown keys {unknown}: is this a {what} head folder?")
    for name, f in known.items():
        v = d.get(name, MISSING)
        want = _TYPES.get(str(f.type))
        if v is not MISSING and want and (not isinstance(v, want) or isinstance(v, bool) and bool not in want):
            raise DSparkError(f"{what} config field {name}={v!r} should be of type {f.type}: re-export the head")
    return cls(**{k: v for k, v in d.items() if k in known})


def target_fields(d, target) -> dict:
    """Config fields every head kind takes from the target, with the `conf/draft` widths that are
    unset (null) following the target's own."""
    tc = target.model.config
    return dict(target=target.name, target_hidden_size=target.hidden_size, target_vocab_size=target.vocab_size,
                target_num_layers=target.num_layers,
                num_attention_heads=d.num_attention_heads or tc.num_attention_heads,
                num_key_value_heads=d.num_key_value_heads or tc.num_key_value_heads,
                intermediate_size=d.intermediate_size or tc.intermediate_size, rms_norm_eps=tc.rms_norm_eps,
                rope_theta=float((getattr(tc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))


class HeadConfigBase:
    """What every head config dataclass shares: the attention head width and the typed reading of
    config.json (`label` names the kind in errors)."""

    label = "draft head"

    @property
    def head_dim(self) -> int:
        return self.target_hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict):
        return config_from_dict(cls, d, cls.label)


class DraftHeadBase:
    """Mixin for nn.Module heads. The class sets `config_class`, `architecture` (its key in every
    layer's registry: models/heads.py, inference/head_drafters.py, train/objectives.py,
    hub/layouts.py) and `from_draft_cfg` (a fresh head from a `conf/draft` node); instances have
    `.config` (with draft_vocab_size, target_vocab_size, target_hidden_size, target_layer_ids, target)
    and take `(config, d2t=…)`."""

    config_class: type
    architecture: str
    compiled_methods: tuple[str, ...] = ()   # a proposal's hot methods, for draft_compile (inference/compiled_head.py)

    @classmethod
    def from_draft_cfg(cls, d, target, d2t):
        raise NotImplementedError

    def init_vocabulary(self, d2t: torch.Tensor | None) -> None:
        """Register d2t (draft id → target id, saved), its inverse t2d (target id → draft id, or
        draft_vocab_size for tokens outside it) and empty slots for the target's shared weights."""
        c = self.config
        d2t = torch.arange(c.draft_vocab_size) if d2t is None else d2t.long()
        if d2t.shape != (c.draft_vocab_size,) or int(d2t.max()) >= c.target_vocab_size or int(d2t.min()) < 0:
            raise DSparkError(f"draft vocabulary map has shape {tuple(d2t.shape)} (ids {int(d2t.min())}..{int(d2t.max())}); "
                              f"expected ({c.draft_vocab_size},) ids in 0..{c.target_vocab_size - 1}")
        self.register_buffer("d2t", d2t)
        t2d = torch.full((c.target_vocab_size,), c.draft_vocab_size, dtype=torch.long)
        t2d[d2t] = torch.arange(c.draft_vocab_size)
        self.register_buffer("t2d", t2d, persistent=False)
        self.register_buffer("embed_weight", torch.empty(0), persistent=False)   # (V, D) target's
        self.register_buffer("lm_weight", torch.empty(0), persistent=False)      # (Vd, D) target's rows
        self.logits_linear = F.linear   # the runtime's drafters may swap in models/cpu_gemm.linear

    def attach(self, target):
        """Share the target's frozen embedding and LM head (rows of the draft vocabulary)."""
        c, m = self.config, target.model
        if target.hidden_size != c.target_hidden_size or target.vocab_size != c.target_vocab_size:
            raise DSparkError(
                f"draft head was built for hidden size {c.target_hidden_size} / vocab {c.target_vocab_size} "
                f"(target '{c.target}') but this target has {target.hidden_size} / {target.vocab_size}: "
                "train a head for this target or pass the matching target")
        bad = [i for i in c.target_layer_ids if not 0 <= i <= target.num_layers]
        if bad:
            raise DSparkError(f"target layer ids {bad} are out of range for a {target.num_layers}-layer target "
                              f"(hidden_states indices 0..{target.num_layers})")
        dev, dtype = next(self.parameters()).device, next(self.parameters()).dtype
        self.embed_weight = m.get_input_embeddings().weight.detach().to(dev)
        self.lm_weight = m.get_output_embeddings().weight.detach()[self.d2t.to(m.device)].to(dev, dtype)
        return self

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float32,
                        state_dict: dict | None = None) -> None:
        """`state_dict`: the weights to write instead of this module's own (a sharded run's gathered full state)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"architectures": [type(self).__name__], **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path):
        folder, arch = Path(folder), cls.__name__
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise DSparkError(f"{folder} is not a draft head folder (needs config.json + model.safetensors): "
                              "run `dspark train` first or pass head=<folder>")
        try:
            raw = json.loads((folder / "config.json").read_text())
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            named = (raw.get("architectures") or [arch])[0]
            if named != arch:
                raise DSparkError(f"{folder / 'config.json'} names architecture '{named}', not {arch}")
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise DSparkError(f"{folder / 'config.json'} is malformed ({e}): re-export the head") from None
        try:
            config = cls.config_class.from_dict(raw)
        except (TypeError, ValueError, DSparkError) as e:
            raise DSparkError(f"{folder / 'config.json'}: {e}") from None
        try:
            state = load_file(str(folder / "model.safetensors"))
        except Exception as e:   # safetensors raises its own error type for a damaged file
            raise DSparkError(f"{folder / 'model.safetensors'} is unreadable ({type(e).__name__}: {e}): "
                              "re-export the head") from None
        model = cls(config, d2t=state.get("d2t"))
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                  strict=True)
        except RuntimeError as e:
            raise DSparkError(f"{folder / 'model.safetensors'} does not match its config.json: "
                              f"{str(e).splitlines()[0]}") from None
        return model

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
