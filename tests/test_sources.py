"""Prompt sources: the shipped GSM8K questions, the `code` subset of ShareGPT, `data=mix`, and the
bench dedupe (no HumanEval or MT-bench prompt is ever selected for training). Selection only: no target."""
import json
from collections import Counter

import pytest

from conftest import REPO, compose_cfg
from dspark.core.errors import DSparkError
from dspark.data.generate import is_heldout, select_prompts
from dspark.data.sources import (GSM8K_FILE, PROMPTS_DIR, bench_prompts, humaneval_file, is_code_prompt,
                                 mtbench_file, read_jsonl)


def cfg_for(tmp_path, *overrides):
    return compose_cfg("generate", "target=tiny", f"output_dir={tmp_path / 'o'}", *overrides)


def jsonl(tmp_path, rows, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def mix(*parts):
    """A `data.sources=` override from (source, count, extra keys) triples."""
    items = []
    for src, count, extra in parts:
        keys = {"source": src, "count": count, **extra}
        items.append("{" + ",".join(f"{k}:{json.dumps(v) if isinstance(v, str) and '/' in v else v}"
                                    for k, v in keys.items()) + "}")
    return "data.sources=[" + ",".join(items) + "]"


def test_gsm8k_ships_with_its_licence(tmp_path):
    assert GSM8K_FILE.is_file() and GSM8K_FILE.suffix == ".gz"
    assert "MIT License" in (PROMPTS_DIR / "gsm8k-LICENSE").read_text()
    assert "gsm8k-LICENSE" in (PROMPTS_DIR / "README.md").read_text()
    pyproject = open(f"{REPO}/pyproject.toml").read()
    assert '"dspark.data" = [' in pyproject and "prompts/*" in pyproject
    train, held, skipped = select_prompts(cfg_for(tmp_path, "data=gsm8k", "max_prompts=null", "heldout_fraction=0"))
    assert len(train) == 7473 and not held and train[0].startswith("Natalia sold clips")
    assert {t.source for t in train} == {"gsm8k"}


def test_code_source_keeps_code_prompts_only(tmp_path):
    assert is_code_prompt("Write a Python function that reverses a list")
    assert is_code_prompt("why does this fail?\n```\nx = 1\n```")
    assert is_code_prompt("SELECT name FROM users WHERE id = 3 -- is this right?")
    assert not is_code_prompt("Write a poem about the sea")
    train, _, _ = select_prompts(cfg_for(tmp_path, "data=sharegpt", "data.source=code", "max_prompts=50"))
    assert len(train) == 50 and all(is_code_prompt(t) for t in train)
    assert {t.source for t in train} == {"code"}


def test_mix_counts_order_sources_and_cross_source_dedupe(tmp_path):
    a = jsonl(tmp_path, [{"prompt": f"alpha {i}"} for i in range(40)] + [{"prompt": "shared prompt"}], "a.jsonl")
    b = jsonl(tmp_path, [{"prompt": "shared prompt"}] + [{"prompt": f"beta {i}"} for i in range(40)], "b.jsonl")
    args = ["data=mix", mix(("jsonl", 10, {"path": str(a), "name": "A"}), ("gsm8k", 5, {}),
                            ("jsonl", 41, {"path": str(b), "name": "B"})), "heldout_fraction=0", "max_prompts=null"]
    # A is cut at 10, so "shared prompt" is first met in B; then a count larger than B's 41 fails
    train, held, skipped = select_prompts(cfg_for(tmp_path, *args))
    assert [t.source for t in train] == ["A"] * 10 + ["gsm8k"] * 5 + ["B"] * 41   # by source, in order
    assert train[:10] == [f"alpha {i}" for i in range(10)] and "shared prompt" in train[15:]
    assert train == select_prompts(cfg_for(tmp_path, *args))[0]                      # deterministic
    # cross-source dedupe: A's shared prompt comes first when A takes everything
    args = ["data=mix", mix(("jsonl", 41, {"path": str(a), "name": "A"}), ("jsonl", 40, {"path": str(b), "name": "B"})),
            "heldout_fraction=0", "max_prompts=null"]
    train, _, skipped = select_prompts(cfg_for(tmp_path, *args))
    assert Counter(t.source for t in train) == {"A": 41, "B": 40} and skipped["duplicate"] == 1
    assert [t for t in train if t == "shared prompt"][0].source == "A"


def test_mix_heldout_by_hash_and_scaling(tmp_path):
    a = jsonl(tmp_path, [{"prompt": f"question {i}"} for i in range(400)])
    train, held, _ = select_prompts(cfg_for(tmp_path, "data=mix", mix(("jsonl", 100, {"path": str(a)}),
                                                                      ("gsm8k", 100, {})), "heldout_fraction=0.2"))
    assert len(train) == 200 and held and not set(train) & set(held)
    assert all(is_heldout(t, 0.2) for t in held) and not any(is_heldout(t, 0.2) for t in train)
    # max_prompts below the counts' sum scales them in proportion; weights share max_prompts out
    train, _, _ = select_prompts(cfg_for(tmp_path, "data=mix", "max_prompts=10"))
    assert Counter(t.source for t in train) == {"sharegpt": 4, "gsm8k": 3, "code": 3}
    train, _, _ = select_prompts(cfg_for(tmp_path, "data=mix", "max_prompts=9",
                                         "data.sources=[{source:gsm8k,weight:2},{source:sharegpt,weight:1}]"))
    assert Counter(t.source for t in train) == {"gsm8k": 6, "sharegpt": 3}


def test_every_existing_single_source_config_still_composes(tmp_path):
    train, _, _ = select_prompts(cfg_for(tmp_path, "max_prompts=5"))
    assert len(train) == 5 and {t.source for t in train} == {"sharegpt"}


def test_no_bench_prompt_is_ever_selected(tmp_path):
    he = read_jsonl(humaneval_file())
    mt = read_jsonl(mtbench_file())
    injected = [
        {"prompt": he[0]["prompt"]},                                                     # verbatim
        {"prompt": "Complete the following Python function.\n\n```python\n" + he[1]["prompt"] + "```"},  # eval's form
        {"prompt": "Please help me:\n" + he[2]["prompt"] + "\nThanks!"},                 # contained
        {"prompt": "  " + mt[0]["turns"][0].upper() + "  "},                             # MT-bench, case/space
        {"prompt": mt[1]["turns"][1]},                                                   # MT-bench second turn
        {"prompt": "an ordinary question"},
    ]
    f = jsonl(tmp_path, injected)
    train, held, skipped = select_prompts(cfg_for(tmp_path, "data=jsonl", f"data.path={f}", "heldout_fraction=0"))
    assert train == ["an ordinary question"] and skipped["bench_overlap"] == 5
    train, _, skipped = select_prompts(cfg_for(tmp_path, "data=mix", mix(("jsonl", 1, {"path": str(f)}),
                                                                         ("gsm8k", 3, {}))))
    assert train[0] == "an ordinary question" and skipped["bench_overlap"] == 5
    bench = bench_prompts()
    assert all(bench.overlaps(r["prompt"]) for r in he) and all(bench.overlaps(t) for r in mt for t in r["turns"])


def cli_error(tmp_path, capsys, *args) -> str:
    """The one error line `dspark generate <args>` prints (exit status 2, nothing written)."""
    from dspark.__main__ import main

    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["generate", "target=tiny", f"output_dir={out}", *args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("dspark generate: error: ") and not out.exists()
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("data.sources=[{source:sharegpt,count:5},{source:wiki,count:5}]", "data.sources[1]: unknown source 'wiki'"),
    ("data.sources=[{source:gsm8k,count:0}]", "data.sources[0] (gsm8k): count=0 is not allowed: use an integer >= 1"),
    ("data.sources=[{source:gsm8k,count:-3}]", "count=-3 is not allowed"),
    ("data.sources=[{source:gsm8k,weight:0}]", "weight=0 is not allowed"),
    ("data.sources=[{source:gsm8k}]", "exactly one of count"),
    ("data.sources=[{source:gsm8k,count:2,weight:1}]", "exactly one of count"),
    ("data.sources=[{source:gsm8k,count:2},{source:sharegpt,weight:1}]", "mixes counts and weights"),
    ("data.sources=[{source:gsm8k,count:2},{source:gsm8k,count:3}]", "distinct name"),
    ("data.sources=[{source:jsonl,count:2}]", "(jsonl) needs a path"),
    ("data.sources=[{source:gsm8k,cout:2}]", "unknown key(s) ['cout']"),
    ("data.sources=[{source:mix,count:2}]", "unknown source 'mix'"),
    ("data.sources=[]", "non-empty list"),
])
def test_bad_mixes_are_one_clear_error(tmp_path, capsys, override, message):
    assert message in cli_error(tmp_path, capsys, "data=mix", override)


def test_mix_that_runs_short_names_the_source_and_the_gap(tmp_path, capsys):
    f = jsonl(tmp_path, [{"prompt": f"q {i}"} for i in range(7)])
    line = cli_error(tmp_path, capsys, "data=mix", "heldout_fraction=0",
                     f"data.sources=[{{source:gsm8k,count:2}},{{source:jsonl,path:'{f}',count:10,name:mine}}]")
    assert "data.sources[1] (mine) ran short: it gave 7 of its 10 training prompts (3 short" in line
    line = cli_error(tmp_path, capsys, "data=mix", "max_prompts=null", "data.sources=[{source:gsm8k,weight:1}]")
    assert "needs max_prompts" in line
