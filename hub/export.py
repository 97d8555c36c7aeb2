"""`dspark export`: a trained head → a Hub-ready folder, and optionally onto the Hub.

The folder (default `<output_dir>/export`) holds `config.json` (the drafter config plus the target's
id and revision), `model.safetensors` (bf16 unless `dtype=`), `README.md` (a model card written from
the run's bench/train/calibrate/generate json) and, with `vllm=true`, `vllm/`: the same head in the
`speculators` format vLLM loads (EAGLE-3 heads also `sglang/`; hub/layouts.py). A head that format
cannot express exactly is refused with one error before the target is loaded; the target is loaded
because the serving folders carry its LM-head rows (and, for EAGLE-3, its embedding). Nothing else:
optimizer, scheduler, RNG and checkpoints stay in the run folder.
The folder is built under a temporary name and renamed into place, so a failed or interrupted export
never leaves a half-written one and a re-export replaces the old one whole.

Export replaces only what it wrote: the folder carries a marker file (`.dspark-export`, never
uploaded), and an `export_dir` that is a file, a non-empty folder without the marker, the run folder
or the head's own folder is refused before anything is written. A later export restores a folder an
interrupted swap left hidden in `.<name>-old-*/` and removes its own stale temporaries.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from dspark.core.errors import DSparkError
from dspark.core.files import folder_lock, write_json_atomic
from dspark.core.methods import head_row
from dspark.models.target import check_head_target, load_target, parse_dtype, target_name

from . import model_card
from .io import EXPORT_MARKER, load_head, push_folder, resolve_head, upload_plan, validate_repo_id
from .layouts import LAYOUTS


def run(cfg) -> dict:
    out = Path(cfg.output_dir)
    push = bool(cfg.push_to_hub or cfg.dry_run)
    repo_id = validate_repo_id(cfg.repo_id) if push or cfg.repo_id else None
    if push and not repo_id:
        raise DSparkError("push_to_hub=true (or dry_run=true) needs repo_id=<user>/<name>")
    dtype = parse_dtype(cfg.dtype)
    dest = Path(cfg.export_dir)
    check_export_dir(dest, out, cfg.head)   # before anything is loaded or written
    folder = resolve_head(cfg.head)
    head = load_head(folder)
    target = target_identity(cfg, head)
    layout = LAYOUTS.get(head.architecture) if cfg.vllm else None
    notes = [f"note: no serving layout for a {type(head).__name__} head"] if cfg.vllm and not layout else []
    results = {"bench": [b for b in (_read_json(p) for p in cfg.bench_files) if b],
               "train": _read_json(cfg.train_json), "calibrate": _read_json(cfg.calibrate_json),
               "generate": _read_json(cfg.generate_json)}
    if layout:
        layout.check(head)              # one clear refusal before the target is loaded
        attach_target(head, target, load_target(cfg.target))
    c = head.config
    for key, value in (("target_name_or_path", target["id"]), ("target_revision", target["revision"])):
        if value and hasattr(c, key):   # config fields a head kind has (EAGLE-3 heads keep theirs as trained)
            setattr(c, key, value)
    temps = [p.get("temperature") for p in (results["calibrate"] or {}).get("positions") or []]
    if hasattr(c, "confidence_temperatures") and not c.confidence_temperatures and temps \
            and all(t is not None for t in temps):
        c.confidence_temperatures = [float(t) for t in temps]

    with folder_lock(dest.parent, f"export-{dest.name}", "dspark export"):   # one export per folder
        _recover(dest)
        summary = _build(cfg, dest, head, target, results, dtype, repo_id, layout, notes)
    if push and not cfg.dry_run:
        summary["pushed"] = push_folder(dest, repo_id, private=bool(cfg.private), commit_message=cfg.commit_message)
        print(f"pushed to {summary['pushed']}")
    write_json_atomic(out / "export.json", summary)
    return summary


def _build(cfg, dest: Path, head, target: dict, results: dict, dtype, repo_id, layout, notes) -> dict:
    """Write the folder under a temporary name, print the report, then rename it into place."""
    c = head.config
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "dspark export", "head": str(cfg.head)}) + "\n")
        write_folder(tmp, head, target, results, dtype, usage_ref=repo_id or _shown(dest), layout=layout)
        plan = upload_plan(tmp)
        summary = {"head": str(cfg.head), "export_dir": str(dest), "dtype": str(cfg.dtype), "target": target["name"],
                   "target_id": target["id"], "target_revision": target["revision"], "files": plan,
                   "bytes": sum(f["bytes"] for f in plan),
                   "card_sources": {k: bool(v) for k, v in results.items()}, "repo_id": repo_id,
                   "dry_run": bool(cfg.dry_run), "pushed": None}
        # The report comes first and the finished folder lands after it, so the exported files are the
        # newest thing this command leaves (a log of its output is never newer than the export).
        for line in notes:
            print(line)
        print(f"exported {c.kind} head ({summary['bytes'] / 1e6:.2f} MB, {cfg.dtype}) → {dest}")
        for f in plan:
            print(f"  {f['path']:<28} {f['bytes']:>12,d} bytes")
        if cfg.dry_run:
            print(f"dry run: would upload these {len(plan)} files to https://huggingface.co/{repo_id} (nothing sent)")
            summary["upload_plan"] = plan
        sys.stdout.flush()
        sys.stderr.flush()
        for p in [tmp, *tmp.rglob("*")]:   # mkdtemp and safetensors make private files; a Hub folder is public
            p.chmod(0o755 if p.is_dir() else 0o644)
            os.utime(p)                    # the files carry the time the export was committed
        _swap_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def write_folder(folder: Path, head, target: dict, results: dict, dtype: torch.dtype,
                 usage_ref: str, layout=None) -> None:
    """config.json + model.safetensors + README.md (+ the serving folders of `layout`, hub/layouts.py,
    written from the attached head) of `head` into an empty `folder`."""
    head.save_pretrained(folder, dtype=dtype)
    check_round_trip(head, folder, dtype)
    head_cfg = json.loads((folder / "config.json").read_text())
    dtype_name = str(dtype).replace("torch.", "")
    card_name = usage_ref.rstrip("/").split("/")[-1] if "/" in usage_ref and not Path(usage_ref).exists() \
        else f"{target['name']}-{head.config.kind}-head"
    (folder / "README.md").write_text(model_card.render(head_cfg, target, results, usage_ref, dtype_name, card_name,
                                                        vllm=layout is not None))
    if layout is None:
        return
    config = layout.write(head, folder, target, dtype)
    rows = [f"- {b.get('prompt_set')}: τ {m['tau']:.2f}, {m['speedup_vs_plain']:.2f}× plain ({b.get('machine')})"
            for b in results.get("bench") or [] for m in [head_row(b, head.config.kind)]
            if m and m.get("tau") is not None]
    t = results.get("train") or {}
    if t.get("val_tau") is not None:
        rows.append(f"- held-out validation during training: expected τ {t['val_tau']:.3f}"
                    + (f", greedy τ {t['val_tau_greedy']:.3f}" if t.get("val_tau_greedy") is not None else "")
                    + (f", walk τ {t['val_tau_walk']:.3f}" if t.get("val_tau_walk") is not None else ""))
    (folder / "vllm" / "README.md").write_text(model_card.render_vllm(config, rows))


def attach_target(head, target: dict, loaded) -> None:
    """Attach the loaded target to `head` (the serving layouts carry its LM-head rows) and complete
    the identity the layouts write: the architectures and context length of the verifier."""
    head.attach(loaded)
    cfg = loaded.model.config
    target["architectures"] = target["architectures"] or list(cfg.architectures or [type(loaded.model).__name__])
    target["max_position_embeddings"] = loaded.max_context


def check_round_trip(head, folder: Path, dtype: torch.dtype) -> None:
    """The written folder must load strictly into the same weights (cast to the export dtype)."""
    back = type(head).from_pretrained(folder).state_dict()
    for k, v in head.state_dict().items():
        want = v.to(dtype).float() if v.is_floating_point() else v
        if not torch.equal(back[k].to(want.device), want):
            raise DSparkError(f"export check failed: {k} does not round-trip through {folder}")


def target_identity(cfg, head) -> dict:
    """The target the head belongs to: its name (as stages name it), Hub id, revision, source, and
    the override that selects it on the command line. Refuses a head trained for another target."""
    t = cfg.target
    check_head_target(head, t, cfg.head)
    name = target_name(t)
    known = (cfg.get("known_targets") or {}).get(t.name) or {}
    hub_id = (cfg.get("target_id") or t.get("name_or_path") or known.get("id")
              or getattr(head.config, "target_name_or_path", None))
    source = (f"{t.gguf_package}/{t.gguf_file}" if t.get("gguf_file") and not t.get("name_or_path") else None)
    cli = f"target.name_or_path={t.name_or_path}" if t.get("name_or_path") else (
        None if t.name == "smollm2-135m" else f"target={t.name}")
    revision = t.get("revision") or getattr(head.config, "target_revision", None)
    return {"name": name, "id": hub_id or None, "revision": revision or None,
            "architectures": list(known.get("architectures") or []), "source": source, "cli": cli}


def _shown(path: Path) -> str:
    """A folder as a reader of the card should type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read_json(path) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path} is not valid json ({e}): re-run the stage that writes it") from None


def check_export_dir(dest: Path, out: Path, head_ref) -> None:
    """Refuse an `export_dir` that export would replace without having written it: a file or link, a
    non-empty folder without the marker, the run folder (or one holding it), or the head's folder (or
    one inside or holding it). Reads only; raises DSparkError."""
    fix = "pass export_dir=<new or empty folder> or remove it yourself"
    d = dest.resolve()
    head = Path(str(head_ref)).expanduser()
    if d == out.resolve() or d in out.resolve().parents:
        raise DSparkError(f"export_dir {dest} is (or holds) the run folder output_dir={out}: "
                          "pass export_dir=<new or empty folder> (default <output_dir>/export)")
    if head.is_dir() and (d == head.resolve() or d in head.resolve().parents or head.resolve() in d.parents):
        raise DSparkError(f"export_dir {dest} is, holds or lies inside the head folder {head} being exported: "
                          "pass export_dir=<new or empty folder>")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise DSparkError(f"export_dir {dest} is a file or link, not a folder export wrote: {fix}")
    if dest.is_dir() and any(dest.iterdir()) and not _owned(dest):
        raise DSparkError(f"export_dir {dest} holds files dspark export did not write (no {EXPORT_MARKER} "
                          f"marker): {fix}")


def _owned(folder: Path) -> bool:
    """Whether `folder` is a real folder carrying the marker export writes into its folders."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return not folder.is_symlink() and isinstance(marker, dict) and marker.get("written_by") == "dspark export"


def _recover(dest: Path) -> None:
    """Undo what a killed export left next to `dest`: when `dest` is missing, restore the newest
    `.<name>-old-*/<name>` of ours (killed between the two renames); then remove our temporaries:
    `.<name>-*` folders (mkdtemp's names) that are empty, marked, or hold one marked `<name>`. Runs
    under the export lock, so no other export is writing them."""
    ours = re.compile(rf"\.{re.escape(dest.name)}-(old-)?[a-z0-9_]{{8}}")
    temps = [p for p in dest.parent.iterdir() if ours.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    hidden = [p / dest.name for p in temps if list(p.iterdir()) == [p / dest.name] and _owned(p / dest.name)]
    if hidden and not dest.exists() and not dest.is_symlink():
        src = max(hidden, key=lambda p: (p / EXPORT_MARKER).stat().st_mtime)
        os.replace(src, dest)
        src.parent.rmdir()
        temps.remove(src.parent)
    for p in temps:
        inside = list(p.iterdir())
        if not inside or _owned(p) or inside == [p / dest.name] and _owned(p / dest.name):
            shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace `dest` by the finished `tmp` (two renames; the old folder is removed last). A kill
    between the renames leaves the old folder in `.<name>-old-*/`, which the next export restores."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-old-"))
        os.replace(dest, old / dest.name)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old and not dest.exists():
            os.replace(old / dest.name, dest)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
