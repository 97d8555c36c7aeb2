"""`dspark generate` on the tiny target: sources, split, exactness, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose_cfg
from dspark.data.generate import is_heldout, run, select_prompts
from dspark.core.errors import DSparkError


def cfg_for(tmp_path, *overrides):
    return compose_cfg("generate", "target=tiny", f"output_dir={tmp_path}", "max_new_tokens=24", "batch_size=3",
                       "chunk_size=3", *overrides)


def jsonl(tmp_path, rows, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


PROMPTS = [{"prompt": f"question number {i}: " + "why? " * (i % 5)} for i in range(12)]


def test_sharegpt_and_jsonl_sources(tmp_path):
    train, held, skipped = select_prompts(cfg_for(tmp_path / "o", "max_prompts=30"))
    assert len(train) == 30 and all(t.strip() for t in train) and len(set(train)) == 30
    f = jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "a"}, {"turns": ["b"]}, {"prompt": " "},
                         {"messages": [{"role": "user", "content": "c"}]}])
    train, held, skipped = select_prompts(cfg_for(tmp_path / "o", "data=jsonl", f"data.path={f}",
                                                  "heldout_fraction=0"))
    assert train == ["a", "b", "c"] and skipped["duplicate"] == 1 and skipped["empty"] == 1


def test_split_is_deterministic_and_disjoint(tmp_path):
    texts = [f"prompt {i}" for i in range(2000)]
    held = [t for t in texts if is_heldout(t, 0.1)]
    assert held == [t for t in texts if is_heldout(t, 0.1)]
    assert 120 < len(held) < 280
    f = jsonl(tmp_path, [{"prompt": t} for t in texts[:200]])
    train, heldout, _ = select_prompts(cfg_for(tmp_path / "o", "data=jsonl", f"data.path={f}",
                                               "heldout_fraction=0.1", "max_prompts=null"))
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 200


def test_generated_tokens_are_the_targets_greedy_continuation(tmp_path, tiny_target):
    import datasets

    f = jsonl(tmp_path, PROMPTS)
    out = tmp_path / "g"
    summary = run(cfg_for(out, "data=jsonl", f"data.path={f}", "heldout_fraction=0"))
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert summary["prompts"] == len(ds) == 12
    for row, src in zip(ds, PROMPTS):
        prompt = tiny_target.encode_chat(src["prompt"].strip())   # sources strip whitespace
        assert row["input_ids"][:len(prompt)] == prompt
        assert row["loss_mask"] == [0] * len(prompt) + [1] * (len(row["input_ids"]) - len(prompt))
        ids = torch.tensor([prompt])
        ref = tiny_target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                         do_sample=False, eos_token_id=tiny_target.eos_token_ids, pad_token_id=0)
        assert row["input_ids"][len(prompt):] == ref[0, len(prompt):].tolist()   # batched == one by one
    again = run(cfg_for(out, "data=jsonl", f"data.path={f}", "heldout_fraction=0"))
    assert again == summary   # finished job: nothing to do


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    import datasets

    f = jsonl(tmp_path, PROMPTS)
    args = ["data=jsonl", f"data.path={f}", "heldout_fraction=0"]
    run(cfg_for(tmp_path / "whole", *args))
    with pytest.raises(SystemExit):
        run(cfg_for(tmp_path / "cut", *args, "stop_after_chunks=2"))
    assert not (tmp_path / "cut" / "dataset").exists() and len(list((tmp_path / "cut" / "chunks").glob("chunk-*.jsonl"))) == 2
    run(cfg_for(tmp_path / "cut", *args))
    a = datasets.load_from_disk(str(tmp_path / "whole" / "dataset")).to_dict()
    b = datasets.load_from_disk(str(tmp_path / "cut" / "dataset")).to_dict()
    assert a == b and len(a["prompt_id"]) == len(set(a["prompt_id"])) == 12


def test_merge_only_trains_on_a_run_still_going(tmp_path):
    import datasets

    f = jsonl(tmp_path, PROMPTS)
    args = ["data=jsonl", f"data.path={f}", "heldout_fraction=0", "chunk_size=4"]
    with pytest.raises(DSparkError, match="no finished chunk"):
        run(cfg_for(tmp_path / "cut", *args, "merge_only=true"))
    assert not (tmp_path / "cut" / "chunks").exists()
    with pytest.raises(SystemExit):
        run(cfg_for(tmp_path / "cut", *args, "stop_after_chunks=1"))
    part = run(cfg_for(tmp_path / "cut", *args, "merge_only=true"))
    ds = datasets.load_from_disk(str(tmp_path / "cut" / "dataset"))
    assert part["partial"] and part["prompts"] == len(ds) == 4
    whole = run(cfg_for(tmp_path / "cut", *args))      # not "nothing to do": it goes on with the rest
    assert "partial" not in whole and whole["prompts"] == 12
    assert run(cfg_for(tmp_path / "cut", *args, "merge_only=true")).get("partial") is None   # all done


def test_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(DSparkError, match=r"bad.jsonl:2"):
        run(cfg_for(tmp_path / "o1", "data=jsonl", f"data.path={bad}"))
    nofield = jsonl(tmp_path, [{"text": "x"}], "nofield.jsonl")
    with pytest.raises(DSparkError, match="no 'prompt'"):
        run(cfg_for(tmp_path / "o2", "data=jsonl", f"data.path={nofield}"))
    empty = jsonl(tmp_path, [], "empty.jsonl")
    with pytest.raises(DSparkError, match="no usable prompts"):
        run(cfg_for(tmp_path / "o3", "data=jsonl", f"data.path={empty}"))


def test_tokenizer_without_chat_template(tmp_path, tiny_target):
    folder = tmp_path / "nochat"
    tiny_target.model.save_pretrained(folder)
    tok = tiny_target.tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = saved
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    f = jsonl(tmp_path, PROMPTS)
    with pytest.raises(DSparkError, match="chat template"):
        run(cfg_for(tmp_path / "o", "data=jsonl", f"data.path={f}", f"target.name_or_path={folder}"))
    assert not (tmp_path / "o" / "generate.json").exists()


@pytest.mark.slow
def test_two_processes_give_the_same_set(tmp_path):
    f = jsonl(tmp_path, PROMPTS)
    common = ["target=tiny", "data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=16"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    one = subprocess.run([sys.executable, "-m", "dspark.generate", *common, f"output_dir={tmp_path / 'one'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "-m", "dspark.generate", *common, f"output_dir={tmp_path / 'two'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(list((tmp_path / "two" / "chunks").glob("chunk-*.jsonl"))) == 2   # each rank wrote its slice
    import datasets

    a = datasets.load_from_disk(str(tmp_path / "one" / "dataset")).to_dict()
    b = datasets.load_from_disk(str(tmp_path / "two" / "dataset")).to_dict()
    assert a == b


def test_feature_cache_holds_the_targets_hidden_states(tmp_path, tiny_target):
    from dspark.data.features import FeatureStore

    f = jsonl(tmp_path, PROMPTS[:4])
    out = tmp_path / "f"
    summary = run(cfg_for(out, "data=jsonl", f"data.path={f}", "heldout_fraction=0", "cache_features=true",
                          "feature_layers=[1,3]"))
    assert summary["features"]["files"] == 1 and summary["features"]["bytes"] > 0   # one store shard (data/features.py)
    rows = [json.loads(line) for c in sorted((out / "chunks").glob("*.jsonl")) for line in c.read_text().splitlines()]
    store = FeatureStore(out / "features", "tiny", [1, 3], tiny_target.hidden_size)
    assert not store.missing(rows)
    row = rows[0]
    layers, last = store.get(row["prompt_id"], len(row["input_ids"]))
    with torch.no_grad():
        res = tiny_target.model(torch.tensor([row["input_ids"]]), output_hidden_states=True)
    want = torch.cat([res.hidden_states[1][0], res.hidden_states[3][0]], -1)
    torch.testing.assert_close(layers.float(), want, atol=0.05, rtol=0.02)
    logits = tiny_target.model.lm_head(last.float())
    assert (logits.argmax(-1) == res.logits[0].argmax(-1)).float().mean() > 0.9   # bf16 storage


def test_feature_layer_out_of_range(tmp_path):
    f = jsonl(tmp_path, PROMPTS[:2])
    with pytest.raises(DSparkError, match="out of range"):
        run(cfg_for(tmp_path / "o", "data=jsonl", f"data.path={f}", "cache_features=true", "feature_layers=[9]"))
    assert not (tmp_path / "o" / "chunks").exists()


def test_hf_source_from_local_files_and_missing_column(tmp_path):
    f = jsonl(tmp_path, [{"question": "first?"}, {"question": "second?"}])
    args = ["data=hf", "data.dataset=json", f"data.data_files={f}", "heldout_fraction=0"]
    train, _, _ = select_prompts(cfg_for(tmp_path / "o", *args, "data.column=question"))
    assert train == ["first?", "second?"]
    with pytest.raises(DSparkError, match="no column 'prompt'"):
        select_prompts(cfg_for(tmp_path / "o", *args))


def test_chunks_from_other_settings_are_refused(tmp_path):
    f = jsonl(tmp_path, PROMPTS[:6])
    args = ["data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=4"]
    with pytest.raises(SystemExit):
        run(cfg_for(tmp_path / "o", *args, "stop_after_chunks=1"))
    with pytest.raises(DSparkError, match="max_new_tokens: 4 -> 5"):
        run(cfg_for(tmp_path / "o", *args, "max_new_tokens=5"))
    assert run(cfg_for(tmp_path / "o", *args, "max_prompts=3"))["prompts"] == 3   # selection may change


def test_all_prompts_too_long_leaves_nothing(tmp_path):
    f = jsonl(tmp_path, PROMPTS[:3])
    out = tmp_path / "o"
    with pytest.raises(DSparkError, match="longer than max_prompt_tokens=2"):
        run(cfg_for(out, "data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_prompt_tokens=2"))
    assert not (out / "chunks").exists() and not (out / "heldout.jsonl").exists()


def snapshot(folder):
    """Every file under a folder with its bytes (a refused run must change none)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_changed_prompt_source_regenerates(tmp_path):
    import datasets

    from dspark.data.generate import prompt_id

    a = jsonl(tmp_path, PROMPTS[:4], "a.jsonl")
    b = jsonl(tmp_path, PROMPTS[2:6], "b.jsonl")
    out = tmp_path / "o"
    args = ["heldout_fraction=0", "max_new_tokens=4"]

    def ids():
        return datasets.load_from_disk(str(out / "dataset"))["prompt_id"]

    run(cfg_for(out, "data=jsonl", f"data.path={a}", *args))
    assert ids() == [prompt_id(p["prompt"].strip()) for p in PROMPTS[:4]]
    run(cfg_for(out, "data=jsonl", f"data.path={b}", *args))   # another file: re-merged, shared rows reused
    assert ids() == [prompt_id(p["prompt"].strip()) for p in PROMPTS[2:6]]
    jsonl(tmp_path, PROMPTS[8:10], "a.jsonl")                 # the same path, edited
    run(cfg_for(out, "data=jsonl", f"data.path={a}", *args))
    assert ids() == [prompt_id(p["prompt"].strip()) for p in PROMPTS[8:10]]


def test_settings_without_chunks_do_not_block(tmp_path):
    f = jsonl(tmp_path, PROMPTS[:3])
    out = tmp_path / "o"
    (out / "chunks").mkdir(parents=True)
    (out / "chunks" / "settings.json").write_text(json.dumps({"temperature": -1.0}))   # left by a refused run
    assert run(cfg_for(out, "data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=4"))["prompts"] == 3


def test_sampled_resume_equals_uninterrupted(tmp_path):
    import datasets

    f = jsonl(tmp_path, PROMPTS)
    args = ["data=jsonl", f"data.path={f}", "heldout_fraction=0", "temperature=1.0", "max_new_tokens=8",
            "batch_size=2", "chunk_size=3"]
    run(cfg_for(tmp_path / "whole", *args))
    with pytest.raises(SystemExit):
        run(cfg_for(tmp_path / "cut", *args, "stop_after_chunks=2"))
    run(cfg_for(tmp_path / "cut", *args))
    a = datasets.load_from_disk(str(tmp_path / "whole" / "dataset")).to_dict()
    b = datasets.load_from_disk(str(tmp_path / "cut" / "dataset")).to_dict()
    assert a == b and len(a["prompt_id"]) == 12


def test_engine_per_row_seeds_ignore_the_batch(tiny_target, tiny_prompts):
    from dspark.inference import Engine

    engine = Engine(tiny_target, temperature=1.0)
    batch = engine.generate(tiny_prompts, 12, seed=[11, 22, 33], eos_token_ids=[]).outputs
    alone = engine.generate(tiny_prompts[1:2], 12, seed=[22], eos_token_ids=[]).outputs
    flipped = engine.generate(tiny_prompts[::-1], 12, seed=[33, 22, 11], eos_token_ids=[]).outputs
    assert alone[0] == batch[1] and flipped == batch[::-1]
    assert engine.generate(tiny_prompts[1:2], 12, seed=[23], eos_token_ids=[]).outputs != alone   # the seed matters
    with pytest.raises(DSparkError, match="one seed per prompt"):
        engine.generate(tiny_prompts, 4, seed=[1])


def test_non_utf8_jsonl_is_one_error(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DSparkError, match=r"latin1.jsonl:2: not UTF-8 .*0xe9.*convert"):
        run(cfg_for(tmp_path / "new" / "o", "data=jsonl", f"data.path={bad}"))
    assert not (tmp_path / "new").exists()   # a refused run leaves no folder


def test_second_run_on_a_locked_folder_is_refused(tmp_path):
    from dspark.core.files import folder_lock

    f = jsonl(tmp_path, PROMPTS[:3])
    out = tmp_path / "o"
    args = ["data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=4"]
    with pytest.raises(SystemExit):
        run(cfg_for(out, *args, "batch_size=1", "chunk_size=1", "stop_after_chunks=1"))
    before = snapshot(out)
    with folder_lock(out, "generate-rank0", "dspark generate"):   # as another job would hold it
        with pytest.raises(DSparkError, match=rf"another dspark generate is writing to .*o \(pid {os.getpid()}\)"):
            run(cfg_for(out, *args))
    assert snapshot(out) == before   # released: its lock file is gone too
    with pytest.raises(DSparkError, match="max_new_tokens: 4 -> 5"):
        run(cfg_for(out, *args, "max_new_tokens=5"))
    assert snapshot(out) == before   # a run refused after taking the lock changes nothing either
    assert run(cfg_for(out, *args))["prompts"] == 3   # and the lock does not outlive a run


def test_too_long_names_the_limit_that_bound(tmp_path):
    f = jsonl(tmp_path, PROMPTS[:2])
    with pytest.raises(DSparkError, match=r"longer than 6 tokens \(the target's context 4096 minus max_new_tokens=4090"):
        run(cfg_for(tmp_path / "o", "data=jsonl", f"data.path={f}", "max_prompt_tokens=100000",
                    "max_new_tokens=4090"))
    assert not (tmp_path / "o").exists()
