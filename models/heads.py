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
RELEASED = Path(__file__).resolve().parents[1] / "heads"    # the committed heads, one per target (a source checkout)


def released_head(target_name: str) -> Path | None:
    """The committed head folder of a target (heads/<target>), or None when it has none."""
    folder = RELEASED / target_name
    return folder if (folder / "config.json").is_file() else None


def build_head(d, target, d2t) -> nn.Module:
    """A fresh head from a `conf/draft` node: `architecture` (default dspark) picks the kind."""
    arch = d.get("architecture") or "dspark"
    if arch not in HEADS:
        raise DSparkError(f"draft.architecture={arch!r} is unknown: choose one of {sorted(HEADS)}")
    return HEADS[arch].from_draft_cfg(d, target, d2t)


def read_head(folder: str | Path) -> nn.Module:
    """The head saved in a local folder (strict: config and weights must match). A Hub repo id goes
    through hub/io.py `load_head`. config.json names the class; the class's `from_pretrained` names
    any damage (missing files, malformed config, mismatched weights)."""
    try:
        arch = (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or ["DSparkDraft"])[0]
    except (OSError, ValueError, AttributeError):
        arch = "DSparkDraft"
    if arch not in HEAD_CLASSES:
        raise DSparkError(f"{Path(folder) / 'config.json'} names architecture '{arch}', "
                          f"not one of {sorted(HEAD_CLASSES)}")
    return HEAD_CLASSES[arch].from_pretrained(folder)
