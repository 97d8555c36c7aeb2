"""Read any trained draft head from its folder: `config.json` names the architecture."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dspark.core.errors import DSparkError

from .dspark import DSparkDraft
from .eagle3 import Eagle3Draft

# Every head kind, by its architecture key (the same key in inference/head_drafters.py DRAFTERS,
# train/objectives.py OBJECTIVES and hub/layouts.py LAYOUTS; docs/adding-a-head.md).
HEADS: dict[str, type[nn.Module]] = {m.architecture: m for m in (DSparkDraft, Eagle3Draft)}
HEAD_CLASSES = {m.__name__: m for m in HEADS.values()}   # config.json "architectures" → class


def build_head(d, target, d2t) -> nn.Module:
    """A fresh head from a `conf/draft` node: `architecture` (default dspark) picks the kind."""
    arch = d.get("architecture") or "dspark"
    if arch not in HEADS:
        raise DSparkError(f"draft.architecture={arch!r} is unknown: choose one of {sorted(HEADS)}")
    return HEADS[arch].from_draft_cfg(d, target, d2t)


def head_architecture(folder: str | Path) -> str:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DSparkError(f"{folder} is not a draft head folder (no config.json): run `dspark train` first "
                          "or pass head=<folder>")
    try:
        arch = (json.loads(path.read_text()).get("architectures") or ["DSparkDraft"])[0]
    except (json.JSONDecodeError, AttributeError) as e:
        raise DSparkError(f"{path} is malformed ({e}): re-export the head") from None
    if arch not in HEAD_CLASSES:
        raise DSparkError(f"{path} names architecture '{arch}', not one of {sorted(HEAD_CLASSES)}")
    return arch


def read_head(folder: str | Path) -> nn.Module:
    """The head saved in a local folder (strict: config and weights must match). A Hub repo id goes
    through hub/io.py `load_head`."""
    return HEAD_CLASSES[head_architecture(folder)].from_pretrained(folder)
