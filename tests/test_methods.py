"""Benchmark methods as records: the display name derives from the record and old names parse back to
it, readers of an old bench.json (names only) still work, and a head drafts its own γ with bench's
`gamma` as a cap (recorded per row, never more asked of any head kind's drafter)."""
import json

import pytest

from conftest import REPO, compose_cfg, tiny_head
from dspark.hub import model_card
from dspark.core.methods import Method, head_row

NAMES = {
    "plain": Method(), "plain@R2": Method(concurrency=2), "oracle": Method("oracle"),
    "prompt_lookup@R4": Method("prompt_lookup", concurrency=4), "hf_prompt_lookup": Method("hf_prompt_lookup"),
    "dspark": Method("dspark", "all"), "dspark+sched": Method("dspark", "sched"),
    "dspark+sched@R8": Method("dspark", "sched", 8), "dflash+gamma1@R2": Method("dflash", "gamma1", 2),
    "dspark:prev+threshold": Method("dspark:prev", "threshold"), "eagle3": Method("eagle3", "all"),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_display_name_round_trips_through_the_record(name):
    method = NAMES[name]
    assert method.name == name
    assert Method.of_row(name, {}) == method                                  # an old row: parsed from its key
    assert Method.of_row("whatever", {"method": method.to_json()}) == method   # a new row: its fields
    assert method.at(1).name == name.split("@R")[0]


def test_old_bench_json_without_fields_still_renders_a_model_card():
    """bench.json written before rows carried their method fields (the committed release's, stripped of
    them): the card and the headline row still come out, parsed from the row names."""
    path = f"{REPO}/heads/smollm2-135m"
    bench = json.loads(open(f"{path}/metrics/bench-humaneval.json").read())
    for row in bench["methods"].values():
        row.pop("method", None)
    others = sorted({name.split("+")[0] for name in bench["methods"] if name.startswith("dspark:")})
    assert others, "the release bench compares the head with an earlier one (extra_heads)"
    assert head_row(bench, "dspark") is bench["methods"]["dspark"]
    card = model_card.render(json.loads(open(f"{path}/config.json").read()), {"name": "smollm2-135m"},
                             {"bench": [bench]}, "heads/smollm2-135m", "bfloat16", "card")
    row = bench["methods"]["dspark"]
    assert f"| **dspark** (this head) | {row['tau']:.2f} |" in card and "| dspark+sched |" in card
    assert f"value: {round(row['tau'], 4)}" in card and f"Rows `{others[0]}`: other heads" in card


def bench_cfg(tmp_path, gamma, *extra):
    return compose_cfg("bench", "target=tiny", f"output_dir={tmp_path / f'g{gamma}'}", f"head={tmp_path / 'head'}",
                       "prompts.limit=1", "max_new_tokens=12", "methods=[plain,oracle]", "policies=[all,gamma1]",
                       f"gamma={gamma}", *extra)


def test_a_head_drafts_its_own_gamma_and_bench_gamma_caps_it(tiny_target, tmp_path, monkeypatch, capsys):
    from dspark.eval import bench
    from dspark.inference import DSparkDrafter

    tiny_head(tiny_target, "markov", draft_vocab=200).save_pretrained(tmp_path / "head")   # trained γ = 5
    asked = []
    propose = DSparkDrafter.propose
    monkeypatch.setattr(DSparkDrafter, "propose", lambda self, states, limits: asked.extend(limits)
                        or propose(self, states, limits))
    for cap, want in ((7, 5), (3, 3), (5, 5)):
        asked.clear()
        bench.run(bench_cfg(tmp_path, cap))
        d = json.loads((tmp_path / f"g{cap}" / "bench.json").read_text())
        assert max(asked) == want                                      # the drafter is never asked for more
        for name, row in d["methods"].items():
            method = Method(**row["method"])
            assert method.name == name and row["concurrency"] == method.concurrency
            assert row["gamma"] == (want if method.trained else cap), name
        assert len(d["methods"]["dspark"]["acceptance_by_position"]) == want
        assert d["gamma"] == cap and f"γ={cap}" in (tmp_path / f"g{cap}" / "bench.md").read_text()
        out = capsys.readouterr().out
        notes = [line for line in out.splitlines() if line.startswith("note:")]
        assert notes == {7: ["note: dspark drafts γ=5: its trained γ (bench gamma=7 is a cap)"],
                         3: ["note: dspark drafts γ=3: bench gamma=3 caps its trained γ=5"], 5: []}[cap]


def test_an_eagle3_drafter_is_capped_at_its_trained_gamma(tiny_target, tmp_path):
    """Unlike the DSpark drafter, the EAGLE-3 drafter drafts whatever it is asked: the bench caps it."""
    from dspark.eval.bench import Bench
    from test_eagle3 import tiny_eagle3_head

    head = tiny_eagle3_head(tiny_target)                     # trained γ = 5
    b = Bench(tiny_target, [tiny_target.encode_chat("hi")], bench_cfg(tmp_path, 7, "policies=[all]"), {"eagle3": head})
    assert b.gamma(Method("eagle3", "all")) == 5 and b.engine(Method("eagle3", "all")).gamma == 5
    assert b.gamma(Method("oracle")) == 7 and b.engine(Method("oracle")).gamma == 7
