"""`dspark generate`: the frozen target regenerates answers to prompts (self-distillation).

Flow: prompts from the `data` source → deduplicated, filtered → held-out split by a hash of the
prompt text (deterministic, recorded in heldout.jsonl, never generated) → each process takes
prompts[rank::world] → continuous batching on the runtime (batch_size at once, shortest first; or, with
responses=original, each prompt's own answer tokenized, no decoding) →
chunks of finished rows written with atomic renames (a re-run skips every prompt already in a chunk)
→ rank 0 merges the chunks into one `datasets` Arrow dataset at `<output_dir>/dataset`.

Reuse: a row is keyed by its prompt id and reused under the same generation settings (`_row_settings`;
a sampled row is seeded by its prompt id, so a resumed run equals an uninterrupted one); the merged
dataset also depends on the prompt selection. Every check runs before the first write, and one lock
per rank keeps a second job off the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from dspark.core.errors import DSparkError
from dspark.core.files import folder_lock, write_json_atomic, write_text_atomic
from dspark.inference import Engine
from dspark.models.target import load_target, load_tokenizer_target

from .features import check_layers
from .server import Server, mixing_error
from .sources import Prompt, bench_prompts, iter_prompts, mix_components, mix_targets


def prompt_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def is_heldout(text: str, fraction: float) -> bool:
    return int(prompt_id(text), 16) % 10_000 < round(fraction * 10_000)


def select_prompts(cfg) -> tuple[list[str], list[str], dict]:
    """(training prompts, held-out prompts, skipped counts), capped at cfg.max_prompts training ones.

    Prompts are stripped; empty ones, duplicates, over-long ones and every benchmark prompt
    (HumanEval, MT-bench: sources.bench_prompts) are skipped and counted; the held-out split is by a
    hash of the text. A `mix` takes its components in order (by source: all of the first, then the
    second, ...), each until it has given its count of training prompts, deduplicated across sources
    (an earlier component keeps a shared prompt). Each prompt is a `Prompt` carrying its source name."""
    from omegaconf import OmegaConf

    d, seen, train, heldout = cfg.data, set(), [], []
    skipped = {"empty": 0, "duplicate": 0, "bench_overlap": 0, "too_long_chars": 0, "too_long_tokens": 0}
    bench = bench_prompts()
    if d.source == "mix":
        parts = mix_components(OmegaConf.to_container(d.sources, resolve=True))
        wants = mix_targets(parts, cfg.max_prompts)
    else:
        parts, wants = [{"source": d.source, "name": d.source}], [cfg.max_prompts]
    for i, (part, want) in enumerate(zip(parts, wants)):
        if want == 0:
            continue
        src_cfg = OmegaConf.create({k: v for k, v in part.items() if k not in ("count", "weight", "name")}) \
            if d.source == "mix" else d
        max_chars, got = part.get("max_chars") or d.max_chars, 0
        for raw in iter_prompts(src_cfg):
            text = raw.strip()
            if not text:
                skipped["empty"] += 1
            elif text in seen:
                skipped["duplicate"] += 1
            elif len(text) > max_chars:
                skipped["too_long_chars"] += 1
            elif bench.overlaps(text):
                skipped["bench_overlap"] += 1
            else:
                seen.add(text)
                text = Prompt(text, part["name"], getattr(raw, "answer", None))
                if is_heldout(text, cfg.heldout_fraction):
                    heldout.append(text)
                else:
                    train.append(text)
                    got += 1
                    if want and got >= want:
                        break
        if d.source == "mix" and got < want:
            raise DSparkError(f"data.sources[{i}] ({part['name']}) ran short: it gave {got} of its {want} training "
                              f"prompts ({want - got} short after dedupe, filters and the held-out split): "
                              f"lower its count (or max_prompts) or add prompts to that source")
    if not train:
        raise DSparkError(f"prompt source '{d.source}' gave no usable prompts: check data.path and the filters")
    return train, heldout, skipped


def row_seed(seed: int, pid: str) -> int:
    """A sampled row's own seed: the same row whatever batch, rank or (resumed) run makes it."""
    return (int(pid, 16) + seed) % 2**63


def settings(cfg, target, train: list[str], heldout: list[str], server=None) -> dict:
    """What the finished dataset depends on: the generation settings and the prompt selection (the
    source config and a digest of the selected prompt ids, so an edited file counts as a change too)."""
    from omegaconf import OmegaConf

    ids = json.dumps([[prompt_id(t) for t in train], [prompt_id(t) for t in heldout]])
    return {"target": target.name, "target_source": target.source, "dtype": str(target.dtype).replace("torch.", ""),
            "source": cfg.data.source, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "heldout_fraction": cfg.heldout_fraction, "max_prompts": cfg.max_prompts,
            "seed": cfg.seed, "cache_features": bool(cfg.cache_features),
            "feature_layers": check_layers(target, cfg.feature_layers) if cfg.cache_features else None,
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "prompts_digest": hashlib.sha1(ids.encode()).hexdigest()[:16],
            # only when set, so chunks of earlier in-process runs stay reusable
            **({"top_k": cfg.top_k} if cfg.top_k else {}), **({"server": server.identity()} if server else {}),
            **({"responses": cfg.responses} if cfg.responses != "regenerate" else {})}


def run(cfg) -> dict:
    from accelerate import Accelerator

    out = Path(cfg.output_dir)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    server = Server.from_cfg(cfg.server) if cfg.backend == "server" else None   # checked before any write
    original = cfg.responses == "original"
    # the server backend and original responses need the weights only for features
    target = load_tokenizer_target(cfg.target) if (server or original) and not cfg.cache_features else \
        load_target(cfg.target, device=acc.device)
    target.encode_chat("probe")   # no chat template → one clear error before any work
    if cfg.cache_features:
        check_layers(target, cfg.feature_layers)
    if server:
        server.check(target)
    engine = server or (None if original else Engine(target, temperature=cfg.temperature, top_p=cfg.top_p,
                                                    top_k=cfg.top_k))
    train, heldout, skipped = select_prompts(cfg)
    if original:
        train, skipped["no_answer"] = [t for t in train if t.answer], sum(not t.answer for t in train)
        if not train:
            raise DSparkError(f"responses=original: none of the {skipped['no_answer']} prompts of '{cfg.data.source}' "
                              "has an answer (gsm8k ships questions only): use responses=regenerate, or sharegpt, "
                              "code or a jsonl with a response field")
    want = settings(cfg, target, train, heldout, server)
    # the lock comes before the first write; a refused run leaves nothing
    with folder_lock(out, f"generate-rank{acc.process_index}", "dspark generate"):
        summary_path = out / "generate.json"
        if summary_path.is_file() and (out / "dataset").is_dir():
            done = json.loads(summary_path.read_text())
            if done.get("settings") == want and not done.get("skipped", {}).get("unanswered") \
                    and not done.get("partial"):   # else: ask again / go on
                if acc.is_main_process:
                    print(f"nothing to do: {done['prompts']} prompts already generated in {out / 'dataset'}")
                return done
        chunks = out / "chunks"
        _check_chunk_settings(chunks, want)
        done_ids = _done_ids(chunks)
        limit, bound = _prompt_limit(cfg, target)
        if cfg.merge_only and not done_ids.intersection(map(prompt_id, train)):
            raise DSparkError(f"merge_only: '{chunks}' holds no finished chunk of these prompts: run without "
                              "merge_only first")
        if not any(prompt_id(t) in done_ids or len(target.encode_chat(t)) <= limit for t in train):
            raise DSparkError(f"all {len(train)} prompts are longer than {bound}")
        acc.wait_for_everyone()
        if acc.is_main_process:   # every check passed: the run's first files
            chunks.mkdir(parents=True, exist_ok=True)
            write_json_atomic(chunks / "settings.json", _row_settings(want))
            write_text_atomic(out / "heldout.jsonl", "".join(
                json.dumps({"prompt_id": prompt_id(t), "prompt": t, "source": getattr(t, "source", cfg.data.source)})
                + "\n"
                for t in heldout))
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        made = 0 if cfg.merge_only else _generate_slice(
            cfg, target, engine, train[acc.process_index::acc.num_processes], chunks, done_ids, limit)
        acc.wait_for_everyone()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            made = sum(gather_object([made]))   # response tokens made by every process this run
            if server:
                server.unanswered = sum(gather_object([server.unanswered]))
        if cfg.cache_features:
            from .features import cache_features

            cache_features(target, cfg.feature_layers, chunks, out / "features", acc.process_index,
                           acc.num_processes)
            acc.wait_for_everyone()
        summary = {}
        if acc.is_main_process:
            summary = _merge(cfg, out, train, want, skipped, heldout, made, time.perf_counter() - t0, server)
            if summary.get("partial"):
                print(f"merge_only: {summary['prompts']} of {len(train)} prompts are in finished chunks; the "
                      "same command without merge_only goes on with the rest", file=sys.stderr)
            print(f"generated {summary['prompts']} prompts, {summary['tokens']} response tokens "
                  f"({summary['tokens_per_s']:.1f} tok/s this run); {len(heldout)} held out; skipped {skipped}")
        acc.wait_for_everyone()
        return summary


def _row_settings(want: dict) -> dict:
    """The settings a generated row depends on (not the prompt selection: max_prompts, heldout_fraction, data)."""
    return {k: v for k, v in want.items() if k not in ("max_prompts", "heldout_fraction", "cache_features",
                                                       "feature_layers", "data", "prompts_digest")}


def _check_chunk_settings(chunks: Path, want: dict) -> None:
    """Chunks made with other generation settings must not be mixed into this run's dataset. Without a
    chunk file a settings.json binds nothing (left by a run stopped before its first chunk)."""
    f = chunks / "settings.json"
    if not f.is_file() or not any(chunks.glob("chunk-*.jsonl")):
        return
    old = json.loads(f.read_text())
    if old.get("server") != want.get("server"):
        raise DSparkError(mixing_error(chunks.parent, old.get("server"), want.get("server")))
    if old != _row_settings(want):
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in _row_settings(want).items() if old.get(k) != v)
        raise DSparkError(f"'{chunks.parent}' holds chunks generated with other settings ({diff}): "
                          "pass a new output_dir= or delete that folder")


def _done_ids(chunks: Path) -> set[str]:
    ids = set()
    for f in chunks.glob("chunk-*.jsonl"):
        ids.update(json.loads(line)["prompt_id"] for line in f.read_text().splitlines() if line)
    return ids


def _prompt_limit(cfg, target) -> tuple[int, str]:
    """The most tokens a prompt may have (chat template included), and the setting that sets it."""
    room = target.max_context - cfg.max_new_tokens
    if cfg.max_prompt_tokens <= room:
        return cfg.max_prompt_tokens, f"max_prompt_tokens={cfg.max_prompt_tokens} tokens: raise it or check the source"
    return room, (f"{room} tokens (the target's context {target.max_context} minus max_new_tokens="
                  f"{cfg.max_new_tokens}): lower max_new_tokens or shorten the prompts")


def _generate_slice(cfg, target, engine, texts: list[str], chunks: Path, done: set[str], limit: int) -> int:
    """Generate every prompt of this process's slice not already in a chunk; returns tokens made.

    Continuous batching: `batch_size` prompts run at once and a waiting one joins as soon as one
    finishes; finished rows go to disk in chunks of `chunk_size` as they complete (an interruption
    loses only rows not yet in a chunk). `engine` may be a data/server.py Server instead (backend=server),
    or None with `responses=original`: each row is then the prompt's own answer, tokenized (no decoding)."""
    todo = []
    for text in texts:
        if prompt_id(text) in done:
            continue
        ids = target.encode_chat(text)
        if len(ids) > limit:
            continue   # counted at the merge: a training prompt without a row was too long
        todo.append((text, ids))
    if not todo:
        return 0
    todo.sort(key=lambda x: len(x[1]))     # prompts that join together have similar lengths: little padding
    buffer, written, made, t0 = [], 0, 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc="generate", unit="prompt")

    def flush():
        nonlocal buffer, written
        write_text_atomic(chunks / f"chunk-{buffer[0]['prompt_id']}.jsonl",
                          "".join(json.dumps(r) + "\n" for r in buffer))
        buffer, written = [], written + 1
        if cfg.stop_after_chunks and written >= cfg.stop_after_chunks:
            bar.close()
            print(f"stopping after {written} chunk(s) as asked (stop_after_chunks)", file=sys.stderr)
            sys.exit(75)

    def finished(i: int, state) -> None:
        nonlocal made
        (text, ids), out = todo[i], state.generated
        buffer.append({"prompt_id": prompt_id(text), "source": getattr(text, "source", cfg.data.source),
                       "prompt_tokens": len(ids),
                       "input_ids": ids + out, "finish": state.finish_reason, **getattr(state, "extra", {})})
        made += len(out)
        bar.update(1)
        bar.set_postfix(tok_s=f"{made / (time.perf_counter() - t0):.1f}")
        if len(buffer) >= cfg.chunk_size:
            flush()

    seeds = [row_seed(cfg.seed, prompt_id(text)) for text, _ in todo]
    try:
        if engine is None:
            for i, (text, _) in enumerate(todo):
                reply = target.encode_reply(text, text.answer)
                finished(i, SimpleNamespace(generated=reply[:cfg.max_new_tokens], finish_reason=(
                    "eos" if len(reply) <= cfg.max_new_tokens and reply[-1:] and reply[-1] in target.eos_token_ids
                    else "length")))
        elif cfg.backend == "server":
            engine.generate(todo, cfg, seeds, finished)
        else:
            engine.generate([ids for _, ids in todo], cfg.max_new_tokens, max_batch=cfg.batch_size,
                            on_finish=finished, seed=seeds)
    finally:   # a server that stops answering: keep the rows it gave
        if buffer:
            flush()
    bar.close()
    return made


def _merge(cfg, out: Path, train: list[str], want: dict, skipped: dict, heldout: list[str],
           made: int, seconds: float, server=None) -> dict:
    import datasets

    order = {prompt_id(t): i for i, t in enumerate(train)}
    rows = {}
    for f in sorted((out / "chunks").glob("chunk-*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["prompt_id"] in order:
                rows[r["prompt_id"]] = r
    ordered = sorted(rows.values(), key=lambda r: order[r["prompt_id"]])
    missing = len(train) - len(ordered) - (server.unanswered if server else 0)
    partial = bool(cfg.merge_only) and any(pid not in rows for pid in order)
    if not partial:
        skipped["too_long_tokens"] = missing
    if server:   # prompts the server gave no valid answer (rejected, malformed, empty): a re-run asks again
        skipped["unanswered"] = server.unanswered
    ds = datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in ordered],
        "loss_mask": [[0] * r["prompt_tokens"] + [1] * (len(r["input_ids"]) - r["prompt_tokens"]) for r in ordered],
        "prompt_id": [r["prompt_id"] for r in ordered],
        "source": [r["source"] for r in ordered],
    })
    ds.info.description = json.dumps(want)
    for stale in out.glob(".dataset-*"):      # left by a merge that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".dataset-"))
    try:
        ds.save_to_disk(str(tmp))
        tmp.chmod(0o755)                        # mkdtemp makes it private
        if (out / "dataset").exists():
            shutil.rmtree(out / "dataset")
        os.replace(tmp, out / "dataset")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(len(r["input_ids"]) - r["prompt_tokens"] for r in ordered)
    summary = {"prompts": len(ordered), "heldout": len(heldout), "tokens": tokens,
               "tokens_per_s": made / max(seconds, 1e-9), "seconds": seconds, "skipped": skipped,
               "finished_by_eos": sum(r["finish"] == "eos" for r in ordered), "settings": want,
               "dataset": str(out / "dataset"), "heldout_file": str(out / "heldout.jsonl")}
    if partial:   # a later run without merge_only goes on instead of answering "nothing to do"
        summary["partial"] = True
    if server:
        summary["server"] = server.summary(ordered)
    if cfg.cache_features:
        files = list((out / "features").glob("*.safetensors"))
        summary["features"] = {"dir": str(out / "features"), "files": len(files),
                               "bytes": sum(f.stat().st_size for f in files), "layers": want["feature_layers"]}
    write_json_atomic(out / "generate.json", summary)
    return summary
