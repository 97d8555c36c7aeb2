"""The bad-input corpus: every stage, every kind of bad value or file. Each case must end with exit
status 2, exactly one error line that names the setting or file, no traceback, and no new or changed
file in the output folder (whose earlier good outputs stay byte-identical).

The cases run in-process through the real CLI entry (`dspark.__main__.main`, Hydra included), which
is what `dspark <stage> …` runs, at a fraction of a subprocess's start-up cost."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_head


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir, tiny_target):
    """A finished tiny run folder: dataset, chunks, generate.json, a head for the tiny target, and odd files."""
    root = tmp_path_factory.mktemp("bad")
    out = root / "run"
    shutil.copytree(Path(data_dir).parent, out)
    tiny_head(tiny_target, "markov").save_pretrained(out / "head")
    other = tiny_head(tiny_target, "markov")
    other.config.target = "some-other-model"
    other.save_pretrained(root / "other-head")
    shutil.copytree(out / "head", root / "seven-head")
    cfg = json.loads((root / "seven-head" / "config.json").read_text())
    (root / "seven-head" / "config.json").write_text(json.dumps({**cfg, "gamma": "seven"}))
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (root / "a-file").write_text("not a folder\n")
    (root / "long.jsonl").write_text(json.dumps({"prompt": "x" * 5000}) + "\n")
    (root / "malformed.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    (root / "empty.jsonl").write_text("\n")
    return root


CASES = [
    # generate
    ("generate", ["temperature=-1"], "temperature"),
    ("generate", ["top_p=1.5"], "top_p"),
    ("generate", ["max_new_tokens=0"], "max_new_tokens"),
    ("generate", ["max_new_tokens=-5"], "max_new_tokens"),
    ("generate", ["max_prompts=-1"], "max_prompts"),
    ("generate", ["max_prompts=0"], "max_prompts"),
    ("generate", ["batch_size=0"], "batch_size"),
    ("generate", ["chunk_size=0"], "chunk_size"),
    ("generate", ["heldout_fraction=1.5"], "heldout_fraction"),
    ("generate", ["feature_layers=[a]"], "feature_layers"),
    ("generate", ["data=jsonl", "data.path={root}/latin1.jsonl"], "latin1.jsonl"),
    ("generate", ["data=jsonl", "data.path={root}/missing.jsonl"], "missing.jsonl"),
    ("generate", ["data=nope"], "data"),
    ("generate", ["data.path={root}/no-sharegpt.json"], "no-sharegpt.json"),
    ("generate", ["max_prompt=3"], "max_prompt"),
    ("generate", ["+temprature=0.5"], "temprature"),
    # train
    ("train", ["optim.lr=nan"], "optim.lr"),
    ("train", ["optim.betas=[0.9]"], "optim.betas"),
    ("train", ["draft.gamma=0"], "draft.gamma"),
    ("train", ["batch_size=0"], "batch_size"),
    ("train", ["max_steps=0"], "max_steps"),
    ("train", ["max_steps=-1"], "max_steps"),
    ("train", ["features=bogus"], "features"),
    ("train", ["features=cache"], "features"),
    ("train", ["resume=true"], "resume"),
    ("train", ["data_dir={root}/nowhere"], "nowhere"),
    ("train", ["draft.sequential_head=lstm"], "sequential_head"),
    # calibrate
    ("calibrate", ["bins=1"], "bins"),
    ("calibrate", ["max_prompts=0"], "max_prompts"),
    ("calibrate", ["head={root}/nohead"], "nohead"),
    # bench
    ("bench", ["gamma=0"], "gamma"),
    ("bench", ["concurrency=[0]"], "concurrency"),
    ("bench", ["concurrency=[-2]"], "concurrency"),
    ("bench", ["max_new_tokens=0"], "max_new_tokens"),
    ("bench", ["methods=[plain,warp]"], "methods"),
    ("bench", ["policies=[all,fastest]"], "policies"),
    ("bench", ["prompt_lookup.min_ngram=5"], "min_ngram"),
    ("bench", ["head={root}/nohead"], "nohead"),
    ("bench", ["head={root}/seven-head"], "gamma"),
    ("bench", ["head={root}/other-head"], "some-other-model"),
    ("bench", ["prompts=jsonl", "prompts.path={root}/latin1.jsonl"], "latin1.jsonl"),
    ("bench", ["max_new_tokens=5000", "prompts.limit=1"], "context"),
    ("bench", ["prompts=jsonl", "prompts.path={root}/long.jsonl"], "context"),
    ("bench", ["prompts=jsonl", "prompts.path={root}/malformed.jsonl"], "malformed.jsonl:2"),
    ("bench", ["prompts=jsonl", "prompts.path={root}/empty.jsonl"], "empty"),
    ("bench", ["prompts=jsonl"], "prompts.path"),
    ("bench", ["target=nope"], "target"),
    ("bench", ["target.name_or_path={root}/no-model"], "trained for target"),
    ("bench", ["target.name_or_path={root}/no-model", "head=null"], "does not exist"),
    ("bench", ["not_a_key=1"], "not_a_key"),
    ("bench", ["load.rates=[0.5,-1]"], "load.rates"),
    ("bench", ["load.rates=[0]"], "load.rates"),
    ("bench", ["load.requests=0"], "load.requests"),
    ("bench", ["load.max_batch=0"], "load.max_batch"),
    ("bench", ["load.seed=-1"], "load.seed"),
    # export
    ("export", ["export_dir={out}"], "export_dir"),
    ("export", ["export_dir={root}/a-file"], "export_dir"),
    ("export", ["dtype=int8"], "dtype"),
    ("export", ["push_to_hub=true"], "repo_id"),
    ("export", ["head={root}/seven-head"], "gamma"),
    # run
    ("run", ["stages=[generate,nope]"], "stages"),
    ("run", ["max_prompts=0"], "max_prompts"),
    ("run", ["generate.batch_size=0"], "batch_size"),
    ("run", ["+train.max_step=5"], "max_step"),
    ("run", ["draft.qk_norm=false"], "export.vllm"),
    # every stage: output_dir that is a file, or under a file
    ("generate", ["output_dir={root}/a-file"], "output_dir"),
    ("train", ["output_dir={root}/a-file/sub"], "output_dir"),
    ("bench", ["output_dir={root}/a-file"], "output_dir"),
]


@pytest.mark.parametrize("stage,args,needle", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_input(stage, args, needle, run_dir, capsys):
    from dspark.__main__ import main

    out = run_dir / "run"
    before, outside = snapshot(out), snapshot(run_dir)
    args = [a.format(root=run_dir, out=out) for a in args]
    extra = {"train": ["draft=tiny", "logger=none"], "run": ["draft=tiny"]}.get(stage, [])
    argv = [stage, "target=tiny", *extra, *([] if any(a.startswith("output_dir=") for a in args)
                                           else [f"output_dir={out}"]), *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dspark {stage}: error: ") and needle.lower() in lines[0].lower(), lines[0]
    assert snapshot(out) == before, "the output folder changed"
    assert snapshot(run_dir) == outside, "files appeared or changed next to the output folder"


def test_corpus_size():
    assert len(CASES) >= 35 and len({s for s, _, _ in CASES}) == 6
