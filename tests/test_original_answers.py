"""`dspark generate responses=original`: each prompt's own answer from the source, tokenized as the
target's chat template renders a reply (no decoding), and training labels such data with the target's
argmax (`loss.labels`, null = by the dataset)."""
import json

import pytest
import torch

from conftest import compose_cfg
from dspark.core.errors import DSparkError
from dspark.data.generate import run as generate
from dspark.data.sources import iter_sharegpt

ROWS = [{"prompt": f"question {i}?", "response": f"answer {i} " + "because " * i} for i in range(10)] + \
       [{"prompt": "no answer here"}, {"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello there"}]}]


def gen_cfg(out, data, *over):
    return compose_cfg("generate", "target=tiny", f"output_dir={out}", "data=jsonl", f"data.path={data}",
                       "heldout_fraction=0", "max_new_tokens=12", "responses=original", *over)


@pytest.fixture()
def data(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


def test_rows_are_the_sources_replies(tmp_path, tiny_target, data):
    import datasets

    summary = generate(gen_cfg(tmp_path / "o", data))
    assert summary["skipped"]["no_answer"] == 1 and summary["prompts"] == 11
    assert summary["settings"]["responses"] == "original"
    answers = {r.get("prompt") or r["messages"][0]["content"]: r.get("response") or
               (r["messages"][1]["content"] if "messages" in r else None) for r in ROWS}
    ds = datasets.load_from_disk(str(tmp_path / "o" / "dataset"))
    finishes = [json.loads(line)["finish"] for f in (tmp_path / "o" / "chunks").glob("chunk-*.jsonl")
                for line in f.read_text().splitlines()]
    assert sorted(set(finishes)) == ["eos", "length"]        # short answers end, long ones are cut at 12
    for row in ds:
        text = tiny_target.tokenizer.decode(row["input_ids"])
        prompt = next(p for p in answers if f"\n{p}" in text)
        head = tiny_target.encode_chat(prompt)
        assert row["input_ids"][:len(head)] == head
        assert row["input_ids"][len(head):] == tiny_target.encode_reply(prompt, answers[prompt])[:12]
        assert sum(row["loss_mask"]) == len(row["input_ids"]) - len(head)
    with pytest.raises(DSparkError, match="other settings"):   # regenerated rows never mix with these
        generate(gen_cfg(tmp_path / "o", data, "responses=regenerate"))


def test_a_source_without_answers_is_one_clear_error(tmp_path):
    with pytest.raises(DSparkError, match="gsm8k ships questions only"):
        generate(compose_cfg("generate", "target=tiny", f"output_dir={tmp_path / 'g'}", "data=gsm8k",
                             "max_prompts=5", "responses=original"))
    assert not (tmp_path / "g").exists()


def test_sharegpt_prompts_carry_the_reply_that_follows():
    items = [p for _, p in zip(range(50), iter_sharegpt())]
    assert sum(isinstance(p.answer, str) and len(p.answer) > 0 for p in items) > 40


@pytest.mark.parametrize("responses", ["original", "regenerate"])
def test_training_labels_follow_the_dataset(tmp_path, data, monkeypatch, responses):
    """On original answers the CE labels are the target's argmax; on regenerated data the dataset's tokens."""
    from dspark.train import objectives
    from dspark.train.trainer import run as train

    generate(gen_cfg(tmp_path, data, f"responses={responses}"))
    seen = []
    real = objectives.block_losses
    monkeypatch.setattr(objectives, "block_losses", lambda *a: seen.append(a) or real(*a))
    train(compose_cfg("train", "target=tiny", "draft=tiny", f"output_dir={tmp_path}", "logger=none",
                      "max_steps=2", "eval_every=2", "save_every=0", "val_fraction=0.2"))
    _, _, target, labels, valid, alpha = seen[0]
    argmax = target.top            # the target's argmax as a draft id (tests/test_train.py checks it)
    assert alpha["labels"] == ("target" if responses == "original" else "data")
    # the answers are not the tiny target's argmax, so data labels would disagree (greedy regenerated
    # data is the argmax, so there both agree)
    assert bool((labels == argmax)[valid].all())
    # the walk τ (the greedy runtime's τ on the rows' tokens) only where the tokens are the target's greedy ones
    assert ("val_tau_walk" in json.loads((tmp_path / "train.json").read_text())) == (responses == "regenerate")


def test_validation_on_another_datasets_held_out_rows(tmp_path, data):
    """val_data_dir: train on original answers, validate on the regenerated rows of the same held-out
    prompts (so τ compares across datasets); no held-out prompt is trained on."""
    from dspark.data.dataset import load_rows, split
    from dspark.train.trainer import Trainer

    generate(gen_cfg(tmp_path / "o", data))
    generate(gen_cfg(tmp_path / "r", data, "responses=regenerate"))
    trainer = Trainer(compose_cfg("train", "target=tiny", "draft=tiny", f"output_dir={tmp_path / 't'}", "logger=none",
                                  "max_steps=1", f"data_dir={tmp_path / 'o' / 'dataset'}", "val_fraction=0.3",
                                  f"val_data_dir={tmp_path / 'r' / 'dataset'}"))
    _, want = split(load_rows(str(tmp_path / "r" / "dataset"), 1024, 10**6), 0.3)
    assert [r["input_ids"] for r in trainer.val_rows] == [r["input_ids"] for r in want]
    assert not {r["prompt_id"] for r in trainer.train_rows} & {r["prompt_id"] for r in want}
    assert trainer.walk_rows == trainer.val_rows      # validated on regenerated rows: the walk runs on them
    assert len(trainer.train_rows) + len(want) >= 11
