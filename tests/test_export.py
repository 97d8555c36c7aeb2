"""`dspark export`: the export loads back strictly with identical logits, the model card carries the
run's measured numbers (and nothing made up), the dry-run upload plan lists exactly the folder and
validates the repo id, a local folder and a Hub id resolve through the same function (the Hub
download is monkeypatched: no network), and export replaces only folders it wrote itself."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import compose_cfg, tiny_head
from dspark.core.errors import DSparkError
from dspark.core.methods import Method
from dspark.hub import export
from dspark.hub import io as hub
from dspark.hub.io import load_head

BENCH = {"target": "tiny", "dtype": "float32", "prompts": 3, "prompt_set": "humaneval", "max_new_tokens": 32,
         "temperature": 0.0, "gamma": 5, "machine": "testbox 2 cpu", "policies": ["all", "sched"],
         "methods": {"plain": {"tokens_per_s": 41.25, "speedup_vs_plain": 1.0, "tau": 1.0, "exact_match_rate": 1.0},
                     "dspark": {"tokens_per_s": 57.75, "speedup_vs_plain": 1.4, "tau": 2.3456,
                                "exact_match_rate": 1.0}}}
TRAIN = {"objective": "dspark", "draft": "tiny", "trainable_params": 53761, "draft_vocab_size": 150, "gamma": 5,
         "steps": 321, "wall_s": 150.0, "processes": 1, "train_rows": 14, "val_rows": 2, "positions_per_s": 1357.8,
         "val_tau": 1.8765, "val_tau_greedy": 1.6543, "val_tau_walk": 1.4321, "val_loss": 1.111}
GENERATE = {"prompts": 16, "heldout": 2, "tokens": 2048,
            "settings": {"source": "sharegpt", "max_new_tokens": 128, "temperature": 0.0}}
CALIBRATE = {"positions": [{"temperature": 1.25, "ece_before": 0.2468, "ece_after": 0.0135},
                           {"temperature": 0.875, "ece_before": 0.1357, "ece_after": 0.0246}]}


def features(target, ids):
    with torch.no_grad():
        hs = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i] for i in (2, 3)], -1)


# A head as conf/draft trains them now (serving-compatible: the speculators layout can express it).
SERVING = dict(qk_norm=True, mask_token_id=258)


def make_run(tmp_path, target, calibrate=True):
    """A run folder as the stages leave it: head/ + the stages' json files."""
    head = tiny_head(target, "markov", draft_vocab=150, **SERVING).eval()
    head.save_pretrained(tmp_path / "head")
    for name, data in [("bench", BENCH), ("train", TRAIN), ("generate", GENERATE)] + (
            [("calibrate", CALIBRATE)] if calibrate else []):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return head


def export_cfg(tmp_path, *overrides):
    return compose_cfg("export", "target=tiny", f"output_dir={tmp_path}", *overrides)


def logits(head, target, ids):
    ids_t = torch.tensor([ids])
    args = (features(target, ids), ids_t, torch.tensor([[3, 11]]), torch.ones_like(ids_t, dtype=torch.bool),
            ids_t[:, :head.config.gamma].expand(2, -1)[None])
    with torch.no_grad():
        return head(*args)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip_is_strict_and_exact(tiny_target, tiny_prompts, tmp_path, dtype):
    head = make_run(tmp_path, tiny_target)
    summary = export.run(export_cfg(tmp_path, f"dtype={dtype}"))
    folder = tmp_path / "export"
    assert sorted(os.listdir(folder)) == [hub.EXPORT_MARKER, "README.md", "config.json", "model.safetensors", "vllm"]
    assert [f["path"] for f in summary["files"]] == ["README.md", "config.json", "model.safetensors",
                                                     "vllm/README.md", "vllm/config.json", "vllm/model.safetensors"]
    back = load_head(folder).attach(tiny_target).eval()
    want = head
    if dtype == "bfloat16":   # the export is the head rounded to bf16: compare with exactly that
        want = tiny_head(tiny_target, "markov", draft_vocab=150, **SERVING).eval()
        want.load_state_dict({k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                              for k, v in head.state_dict().items()})
    for a, b in zip(logits(want, tiny_target, tiny_prompts[2]), logits(back, tiny_target, tiny_prompts[2])):
        assert torch.equal(a, b)
    config = json.loads((folder / "config.json").read_text())
    assert config["confidence_temperatures"] == [1.25, 0.875]        # from calibrate.json
    assert config["target_layer_ids"] == head.config.target_layer_ids and config["gamma"] == 5
    assert json.loads((tmp_path / "export.json").read_text())["files"] == summary["files"]


def test_card_carries_the_measured_numbers_and_omits_missing_sections(tiny_target, tmp_path):
    make_run(tmp_path, tiny_target, calibrate=False)
    export.run(export_cfg(tmp_path))
    card = (tmp_path / "export" / "README.md").read_text()
    for number in ["2.35", "1.40×", "57.8", "1.877", "1.654", "1.432", "321 steps", "2048 response tokens", "0.05M",
                   "testbox 2 cpu", "`sched`"]:
        assert number in card, number
    assert card.startswith("---\nlibrary_name: dspark\n") and "speculative-decoding" in card
    assert "value: 2.3456" in card and "value: 1.8765" in card and "value: 1.4321" in card          # Hub metadata metrics
    assert "## Calibration" not in card                                   # no calibrate.json: no section
    for bad in ["TODO", "placeholder", "nan", "None", "XX"]:
        assert bad not in card, bad
    assert "dspark bench head=" in card and "target=tiny" in card


def test_card_names_a_folder_inside_the_working_directory_relatively(tiny_target, tmp_path, monkeypatch):
    make_run(tmp_path, tiny_target, calibrate=False)
    monkeypatch.chdir(tmp_path)
    export.run(export_cfg(tmp_path, f"export_dir={tmp_path / 'heads' / 'mine'}"))
    card = (tmp_path / "heads" / "mine" / "README.md").read_text()
    assert "dspark bench head=heads/mine " in card and str(tmp_path) not in card


def test_card_bench_notes_follow_the_rows():
    from dspark.hub import model_card

    plain = {"tau": 1.0, "speedup_vs_plain": 1.0, "tokens_per_s": 20.0, "divergences_all_near_ties": True}
    b = {**BENCH, "methods": {"plain": plain, "dspark": {**plain, "tau": 1.3}}}
    text = model_card._bench(b, "dspark")
    assert "near-tie" in text and "`oracle`" not in text and "other heads" not in text
    b["methods"].update({"oracle": plain, "dspark:prev": {**plain, "divergences_all_near_ties": False}})
    text = model_card._bench(b, "dspark")
    assert "`oracle` proposes" in text and "Rows `dspark:prev`: other heads" in text and "near-tie" not in text
    # rows that carry their method record (bench.json since the records) read the same as names alone
    fields = {k: {**m, "method": Method.of_row(k, m).to_json()} for k, m in b["methods"].items()}
    assert model_card._bench({**b, "methods": fields}, "dspark") == text
    assert fields["dspark:prev"]["method"] == {"head": "dspark:prev", "policy": "all", "concurrency": 1}


def test_card_calibration_table(tiny_target, tmp_path):
    make_run(tmp_path, tiny_target)
    export.run(export_cfg(tmp_path))
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| 1 | 1.250 | 0.2468 | 0.0135 |" in card and "| 2 | 0.875 | 0.1357 | 0.0246 |" in card


def test_vllm_layout(tiny_target, tmp_path):
    """vllm/ holds the speculators DSpark layout (tests/test_speculators.py loads it into speculators)."""
    from safetensors.torch import load_file

    head = make_run(tmp_path, tiny_target)
    export.run(export_cfg(tmp_path, "dtype=float32"))
    v = tmp_path / "export" / "vllm"
    config = json.loads((v / "config.json").read_text())
    c = head.config
    assert config["speculators_model_type"] == "dspark" and config["block_size"] == 5
    assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny"
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]   # from the loaded target
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    assert config["transformer_layer_config"]["head_dim"] == c.head_dim
    assert config["aux_hidden_state_layer_ids"] == c.target_layer_ids                # hidden_states indices, unshifted
    assert (config["markov_rank"], config["markov_head_type"], config["mask_token_id"]) == (8, "vanilla", 258)
    assert config["sample_from_anchor"] is True and config["confidence_head_with_markov"] is True
    assert config["dspark_confidence_temperatures"] == [1.25, 0.875]                  # from calibrate.json
    w = load_file(str(v / "model.safetensors"))
    assert torch.equal(w["fc.weight"], head.context_proj.weight)
    assert torch.equal(w["markov_head.markov_w2.weight"], head.chunk_head.up_proj.weight)
    assert w["markov_head.markov_w1.weight"].shape == (tiny_target.vocab_size, c.head_rank)   # over the target vocab
    assert torch.equal(w["markov_head.markov_w1.weight"][head.d2t], head.token_embed.weight[:150])
    outside = head.t2d == 150
    assert (w["markov_head.markov_w1.weight"][outside] == head.token_embed.weight[150]).all()  # the "outside" row
    assert torch.equal(w["confidence_head.proj.weight"], head.confidence.weight)
    assert torch.equal(w["layers.0.self_attn.q_norm.weight"], head.layers[0].self_attn.q_norm.weight)
    assert torch.equal(w["lm_head.weight"], head.lm_weight)                            # the target's rows d2t
    assert torch.equal(w["d2t"] + torch.arange(150), head.d2t) and int(w["t2d"].sum()) == 150
    assert "embed_tokens.weight" not in w and "mask_embedding" not in w
    assert not any(k.startswith(("context_proj", "chunk_head", "token_embed", "confidence.")) for k in w)
    assert "vllm serve" in (v / "README.md").read_text() and "DSPARK" in (v / "README.md").read_text()


def test_dry_run_lists_exactly_the_upload_and_never_pushes(tiny_target, tmp_path, monkeypatch, capsys):
    make_run(tmp_path, tiny_target)
    monkeypatch.setattr(export, "push_folder", lambda *a, **k: pytest.fail("dry run must not push"))
    summary = export.run(export_cfg(tmp_path, "dry_run=true", "repo_id=alice/tiny-dspark"))
    on_disk = sorted(str(p.relative_to(tmp_path / "export")) for p in (tmp_path / "export").rglob("*")
                     if p.is_file() and p.name != hub.EXPORT_MARKER)
    assert [f["path"] for f in summary["upload_plan"]] == on_disk
    assert all(f["bytes"] == (tmp_path / "export" / f["path"]).stat().st_size for f in summary["upload_plan"])
    out = capsys.readouterr().out
    assert "would upload" in out and "alice/tiny-dspark" in out and "model.safetensors" in out
    assert "dspark bench head=alice/tiny-dspark" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "-alice/x", "alice/x-", "alice/a..b", "al ice/x", "alice/",
                                 "alice/x.git", "alice/" + "x" * 97])
def test_bad_repo_ids_are_refused_before_anything_is_written(tiny_target, tmp_path, bad):
    make_run(tmp_path, tiny_target)
    with pytest.raises(DSparkError, match="repo id"):
        export.run(export_cfg(tmp_path, "push_to_hub=true", f"repo_id='{bad}'"))
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.json").exists()


def test_hub_id_and_folder_take_the_same_path(tiny_target, tmp_path, monkeypatch):
    make_run(tmp_path, tiny_target)
    export.run(export_cfg(tmp_path))
    folder = tmp_path / "export"
    calls, resolved = [], []
    monkeypatch.setattr(hub, "_download", lambda rid, rev: calls.append((rid, rev)) or str(folder))
    real = hub.resolve_head
    monkeypatch.setattr(hub, "resolve_head", lambda ref, rev=None: resolved.append(str(ref)) or real(ref, rev))
    a = load_head(folder)
    assert calls == [] and resolved == [str(folder)]                     # a folder: no download
    b = load_head("alice/tiny-dspark@v1")
    assert calls == [("alice/tiny-dspark", "v1")] and resolved[-1] == "alice/tiny-dspark@v1"
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(DSparkError, match="neither a folder nor a Hub repo id"):
        load_head(tmp_path / "missing" / "head")


def test_offline_hub_id_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DSparkError, match="nor in the local Hub cache"):
        hub.resolve_head("nobody-here/no-such-head-7f3a")


def test_reexport_replaces_whole_and_a_failure_keeps_the_old_one(tiny_target, tmp_path, monkeypatch):
    make_run(tmp_path, tiny_target)
    export.run(export_cfg(tmp_path))
    (tmp_path / "export" / "stale.txt").write_text("old")
    export.run(export_cfg(tmp_path))
    assert not (tmp_path / "export" / "stale.txt").exists()
    before = (tmp_path / "export" / "README.md").read_text()
    monkeypatch.setattr(export.model_card, "render", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export.run(export_cfg(tmp_path))
    assert (tmp_path / "export" / "README.md").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_wrong_target_and_missing_head_fail_with_one_line(tiny_target, tmp_path):
    make_run(tmp_path, tiny_target)
    with pytest.raises(DSparkError, match="trained for target 'tiny'"):
        export.run(export_cfg(tmp_path, "target=smollm2-135m"))
    empty = tmp_path / "empty"
    res = subprocess.run([sys.executable, "-m", "dspark", "export", "target=tiny", f"output_dir={empty}"],
                         capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "dspark export: error:" in res.stderr
    assert not empty.exists()


def test_exported_files_are_newer_than_the_commands_output(tiny_target, tmp_path):
    """Report first, then the folder lands: a log of the command is never newer than the export
    (how the contract check tells a fresh export from one left by an earlier run)."""
    make_run(tmp_path, tiny_target)
    log = tmp_path / "log"
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "dspark", "export", "target=tiny", f"output_dir={tmp_path}"],
                             stdout=f, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                                      if k != "PYTHONUNBUFFERED"})
    assert res.returncode == 0 and "exported dspark head" in log.read_text()
    files = [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert len(files) == 7 and all(p.stat().st_mtime_ns >= log.stat().st_mtime_ns for p in files)


def snapshot(root):
    """Every path under `root` with its bytes (files) and mtime: equal snapshots = nothing was written."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def test_export_dir_equal_to_output_dir_is_refused_and_the_run_is_untouched(tiny_target, tmp_path):
    run = tmp_path / "run"
    make_run(run, tiny_target)
    for name in ["dataset/data-00000.arrow", "checkpoints/step-100/model.safetensors", "head.json"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(os.urandom(64))
    before = snapshot(tmp_path)
    res = subprocess.run([sys.executable, "-m", "dspark", "export", "target=tiny", f"output_dir={run}",
                          f"export_dir={run}"], capture_output=True, text=True,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "export_dir" in res.stderr and str(run) in res.stderr and "pass export_dir=" in res.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["file", "foreign folder", "link", "head folder", "inside the head",
                                   "above the run"])
def test_export_dir_it_did_not_write_is_refused_before_anything(tiny_target, tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    make_run(run, tiny_target)
    (run / "notes.txt").write_text("mine")
    (run / "mine").mkdir()
    (run / "mine" / "a.txt").write_text("mine")
    (run / "link").symlink_to(run / "mine")
    dest = {"file": run / "notes.txt", "foreign folder": run / "mine", "link": run / "link",
            "head folder": run / "head", "inside the head": run / "head" / "export", "above the run": tmp_path}[where]
    monkeypatch.setattr(export, "load_head", lambda *a: pytest.fail("checked after loading the head"))
    before = snapshot(tmp_path)
    with pytest.raises(DSparkError, match="export_dir") as e:
        export.run(export_cfg(run, f"export_dir={dest}"))
    assert str(dest) in str(e.value) and "pass export_dir=" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmp_path) == before


def test_marker_marks_the_folder_and_is_never_listed_or_uploaded(tiny_target, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    make_run(tmp_path, tiny_target)
    (tmp_path / "export").mkdir()                       # an empty folder is accepted
    summary = export.run(export_cfg(tmp_path, "dry_run=true", "repo_id=alice/tiny-dspark"))
    marker = tmp_path / "export" / hub.EXPORT_MARKER
    assert json.loads(marker.read_text())["written_by"] == "dspark export"
    assert hub.EXPORT_MARKER not in [f["path"] for f in summary["files"] + summary["upload_plan"]]
    assert hub.EXPORT_MARKER not in capsys.readouterr().out
    sent = {}

    class Api:
        def whoami(self):
            return {}

        def create_repo(self, repo_id, **k):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **k):
            sent.update(k)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    hub.push_folder(tmp_path / "export", "alice/tiny-dspark")
    files = [p.relative_to(tmp_path / "export").as_posix() for p in sorted((tmp_path / "export").rglob("*"))
             if p.is_file()]
    uploaded = list(filter_repo_objects(files, ignore_patterns=sent["ignore_patterns"]))
    assert uploaded == [f["path"] for f in hub.upload_plan(tmp_path / "export")] and len(uploaded) == len(files) - 1


def test_interrupted_swap_is_restored_and_only_our_stale_temporaries_go(tiny_target, tmp_path, monkeypatch):
    make_run(tmp_path, tiny_target)
    export.run(export_cfg(tmp_path))
    card = (tmp_path / "export" / "README.md").read_text()
    old = tempfile.mkdtemp(dir=tmp_path, prefix=".export-old-")           # killed between the two renames
    os.replace(tmp_path / "export", os.path.join(old, "export"))
    build = tempfile.mkdtemp(dir=tmp_path, prefix=".export-")             # killed while writing
    (tmp_path / build / hub.EXPORT_MARKER).write_text('{"written_by": "dspark export"}')
    (tmp_path / build / "config.json").write_text("{")
    tempfile.mkdtemp(dir=tmp_path, prefix=".export-")                     # killed right after mkdtemp
    foreign = [tmp_path / ".export-notes", tempfile.mkdtemp(dir=tmp_path, prefix=".export-old-")]
    for f in foreign:                                                      # not ours: no marker / not our name
        (tmp_path / f / "export").mkdir(parents=True)
        (tmp_path / f / "export" / "a.txt").write_text("mine")
    monkeypatch.setattr(export.model_card, "render", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):                                      # recovers, then fails: the old one stays
        export.run(export_cfg(tmp_path))
    assert (tmp_path / "export" / "README.md").read_text() == card
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export"))
    assert left == sorted(os.path.basename(f) for f in foreign)
    assert all((tmp_path / f / "export" / "a.txt").read_text() == "mine" for f in foreign)
    monkeypatch.undo()
    export.run(export_cfg(tmp_path))
    assert (tmp_path / "export" / hub.EXPORT_MARKER).is_file() and (tmp_path / "export" / "vllm").is_dir()


def test_a_second_export_into_the_same_folder_is_refused_while_one_runs(tiny_target, tmp_path):
    from dspark.core.files import folder_lock

    make_run(tmp_path, tiny_target)
    with folder_lock(tmp_path, "export-export", "dspark export"):          # as a running export holds it
        with pytest.raises(DSparkError, match="another dspark export is writing"):
            export.run(export_cfg(tmp_path))
    assert not (tmp_path / "export").exists()


def test_card_names_a_warm_start():
    from dspark.hub import model_card

    run = {"objective": "dspark", "steps": 10, "wall_s": 60.0, "processes": 1}
    assert "Warm start" not in model_card._training({**run, "init_from": None}, None)
    assert "weights and draft vocabulary of `runs/L/head`" in model_card._training({**run, "init_from": "runs/L/head"},
                                                                                  None)
