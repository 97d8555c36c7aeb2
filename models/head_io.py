"""Hugging Face style I/O shared by every draft head: `config.json` (architecture + config
dataclass) and `model.safetensors`, loaded strictly with one clear error per kind of damage."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DSparkError


class HeadIO:
    """Mixin: the class sets `config_class`; instances have `.config` and take `(config, d2t=…)`."""

    config_class: type

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
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
            config = cls.config_class.from_dict(raw)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise DSparkError(f"{folder / 'config.json'} is malformed ({e}): re-export the head") from None
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
