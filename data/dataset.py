"""The self-distilled dataset on disk (`dspark generate`): loading with clear errors, and the
deterministic held-out split that training validates on and calibration measures on."""
from __future__ import annotations

import json
from pathlib import Path

from dspark.core.errors import DSparkError


def load_rows(data_dir: str, max_seq_len: int, vocab_size: int, target: str | None = None) -> list[dict]:
    """The rows with response tokens, truncated to max_seq_len. With `target` (its name), a dataset that
    `dspark generate` recorded as made for another target is refused (older datasets without the record pass)."""
    import datasets

    path = Path(data_dir)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise DSparkError(f"no dataset at {path}: run `dspark generate output_dir=…` first or pass data_dir=<folder>")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:   # datasets raises several types for a damaged folder
        raise DSparkError(f"{path} is not a readable dataset ({type(e).__name__}: {e}): re-run dspark generate") from None
    missing = {"input_ids", "loss_mask", "prompt_id"} - set(ds.column_names)
    if missing:
        raise DSparkError(f"dataset {path} lacks columns {sorted(missing)}: it was not made by dspark generate")
    made_for = generated_for(ds)
    if target and made_for and made_for != target:
        raise DSparkError(f"dataset {path} was generated for target '{made_for}', not '{target}': regenerate it "
                          f"with `dspark generate target=…` for this target, or pass data_dir= of a {target} dataset")
    rows, has_source = [], "source" in ds.column_names
    for r in ds:
        ids, mask = r["input_ids"][:max_seq_len], r["loss_mask"][:max_seq_len]
        if sum(mask[1:]) == 0:
            continue
        if max(ids) >= vocab_size:
            raise DSparkError(f"dataset {path} has token id {max(ids)} >= the target's vocabulary {vocab_size}: "
                              "it was generated with another tokenizer; regenerate it with this target")
        rows.append({"input_ids": ids, "loss_mask": mask, "prompt_id": r["prompt_id"],
                     "source": r["source"] if has_source else ""})
    if not rows:
        raise DSparkError(f"dataset {path} has no rows with response tokens: generate more data")
    return rows


def generated_for(ds) -> str | None:
    """The target `dspark generate` recorded in the dataset's description (None when not recorded)."""
    return _recorded(ds.info.description).get("target")


def responses_of(data_dir: str) -> str:
    """How the dataset's answers were made (`dspark generate responses=`): "regenerate" unless recorded."""
    return _made(data_dir).get("responses", "regenerate")


def greedy_regenerated(data_dir: str) -> bool:
    """Whether the dataset's answers are the target's own greedy output (regenerated at temperature 0), so
    its tokens are the target's greedy choices."""
    made = _made(data_dir)
    return bool(made) and made.get("responses", "regenerate") == "regenerate" \
        and float(made.get("temperature", 0.0)) == 0.0


def _made(data_dir: str) -> dict:
    """The generate settings recorded in a dataset folder ({} when none are)."""
    try:
        info = json.loads((Path(data_dir) / "dataset_info.json").read_text())
    except (OSError, ValueError):
        return {}
    return _recorded(info.get("description"))


def _recorded(description) -> dict:
    try:
        made = json.loads(description or "")
    except (TypeError, ValueError):
        return {}
    return made if isinstance(made, dict) else {}


def split(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hash split on prompt_id; at least one row each side when there are two or more rows."""
    val = [r for r in rows if int(r["prompt_id"][:8], 16) % 10_000 < val_fraction * 10_000]
    if not val and len(rows) > 1:
        val = rows[-1:]
    ids = {id(r) for r in val}
    train = [r for r in rows if id(r) not in ids]
    if not train:
        raise DSparkError(f"only {len(rows)} row(s): not enough to train and validate; generate more data")
    return train, val
