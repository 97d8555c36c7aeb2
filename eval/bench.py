"""`dspark bench`: every decoding method on one prompt set, side by side, in one process.

Plain decoding at R=1 runs first and is the reference: every other method's outputs are compared
with it token for token (docs/design.md §5: in bf16 a divergence is legitimate only at a near-tie of the
plain run's top-1/top-2 logits, so each divergence's margin is reported). Speedups are ratios of
tokens/s measured in this run against plain decoding at the same concurrency R; the methods run
interleaved batch by batch, so a shared machine's drifting load cannot favour one of them.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.core.errors import DSparkError
from dspark.core.files import write_json_atomic, write_text_atomic
from dspark.core.methods import Method, split_policy
from dspark.hub.io import is_repo_ref, load_head
from dspark.inference import CombinedDrafter, Engine, OracleDrafter, PromptLookupDrafter, Stats, drafter_for
from dspark.inference.policy import make_policy
from dspark.inference.profile import step_cost_profile
from dspark.models.heads import released_head
from dspark.models.target import check_head_target, load_target

from .arrivals import run_arrivals
from .prompts import load_prompts
from .report import load_summary, markdown, write_plots


def run(cfg) -> dict:
    out_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    texts = load_prompts(cfg.prompts)
    heads = trained_heads(cfg)          # a missing or mismatched head fails before the target loads
    target = load_target(cfg.target)
    prompts = [target.encode_chat(t) for t in texts]
    for i, p in enumerate(prompts):
        if len(p) + cfg.max_new_tokens > target.max_context:
            raise DSparkError(f"prompt {i} has {len(p)} tokens + max_new_tokens {cfg.max_new_tokens} > the target's "
                              f"context {target.max_context}: lower max_new_tokens or use shorter prompts")
    bench = Bench(target, prompts, cfg, heads)
    for name, head in heads.items():   # a head drafts its own γ; bench's gamma only caps it
        g, own = bench.gamma(Method(name, "all")), head.config.gamma
        if own != cfg.gamma:
            why = (f"its trained γ (bench gamma={cfg.gamma} is a cap)" if g == own else
                   f"bench gamma={cfg.gamma} caps its trained γ={own}")
            print(f"note: {name} drafts γ={g}: {why}", flush=True)
    bench.warm_up()
    rows = {}
    reference = bench.plain_reference()
    for r in cfg.concurrency:
        # Hugging Face assisted generation serves one request at a time
        level = [m.at(r) for m in bench.methods() if r == 1 or not m.hugging_face]
        measured = bench.measure_level(level)
        for m in level:
            stats, outputs = measured[m]
            row = bench.row(stats, outputs, reference[1], measured[Method(concurrency=r)][0])
            row.update(concurrency=r, gamma=bench.gamma(m), method=m.to_json())
            rows[m] = row
    methods = {m.name: row for m, row in rows.items()}
    report = {
        "target": target.name, "target_source": target.source, "dtype": str(target.dtype).replace("torch.", ""),
        "prompts": len(prompts), "prompt_set": cfg.prompts.source, "max_new_tokens": cfg.max_new_tokens,
        "ignore_eos": cfg.ignore_eos,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "gamma": cfg.gamma,
        "near_tie_margin": cfg.near_tie_margin, "seed": cfg.seed,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu threads={torch.get_num_threads()}"
                   + (f" {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
                   + (" bf16-linears=cpu_gemm" if target.cpu_gemm else ""),
        "policies": list(cfg.policies), "step_cost": bench.cost.to_json() if bench.cost else None,
        "methods": methods, "outside_draft_vocab": outside_vocabulary(heads, reference[1]),
    }
    if cfg.load.rates:   # requests arriving at each rate, joining the running batch (eval/arrivals.py)
        report["arrivals"] = run_arrivals(bench, reference[1])
    report["plots"] = write_plots(report, out_dir)
    if len(cfg.concurrency) > 1:
        report["load"] = load_summary(report)
    table = markdown(report)
    write_json_atomic(out_dir / "bench.json", report)
    write_text_atomic(out_dir / "bench.md", table + "\n")
    print(table)
    print(f"wrote {out_dir / 'bench.json'}")
    best = max((row["speedup_vs_plain"] for m, row in rows.items() if m.head not in (None, "oracle")), default=1.0)
    return {"best_speedup": best}


def outside_vocabulary(heads: dict, outputs: list[list[int]]) -> dict:
    """Head → share of plain greedy's output tokens outside its draft vocabulary: positions it can
    never draft correctly (bounds position-1 acceptance from above)."""
    ids = torch.tensor([t for out in outputs for t in out], dtype=torch.long)
    if not ids.numel():
        return {}
    return {name: float((h.t2d.cpu()[ids] == h.config.draft_vocab_size).float().mean()) for name, h in heads.items()}


def trained_heads(cfg) -> dict:
    """Method name → head: `head` (default <output_dir>/head, used when present; else, with
    `released_head=true`, the committed head for this target under heads/) and every folder in
    `extra_heads` (must exist). An explicit `head=` must exist. Named by kind (dspark / dflash), plus
    the folder's name on a clash (`_unique_name`). Every head must belong to the configured target."""
    head = cfg.head
    local = Path(str(head)).expanduser()
    out = Path(str(cfg.output_dir)).expanduser()
    default = local.name == "head" and (local.parent == out or local.parent in out.parents)   # multirun: the sweep root's
    if head and default and not local.is_dir():   # no trained head in output_dir yet
        released = released_head(cfg.target.name) if cfg.get("released_head") else None
        head = str(released) if released else None
    elif head and not local.is_dir() and (local.parent.is_dir() or not is_repo_ref(head)):
        raise DSparkError(f"head={head} does not exist: pass a trained head folder or Hub repo id, "
                          "or drop head= to use <output_dir>/head")
    folders = ([head] if head else []) + list(cfg.extra_heads)
    heads = {}
    for folder in folders:
        head = load_head(folder)
        check_head_target(head, cfg.target, folder)
        heads[_unique_name(head.config.kind, folder, heads)] = head
    return heads


def _unique_name(kind: str, folder, taken) -> str:
    """`kind`, or on a clash `kind:<folder name>` (the parent's name for a folder called `head`, as in
    runs/<run>/head), numbered when that clashes too: two heads never share a bench row."""
    if kind not in taken:
        return kind
    path = Path(str(folder))
    base = f"{kind}:{path.parent.name if path.name == 'head' and path.parent.name else path.name}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


class Bench:
    def __init__(self, target, prompts: list[list[int]], cfg, heads: dict | None = None):
        self.target, self.prompts, self.cfg = target, prompts, cfg
        self.heads = heads or {}
        self.streams: dict[int, list[int]] = {}
        self.margins: list[list[float]] = []
        self.cost = None
        if self.heads and any(split_policy(p)[1] == "sched" for p in cfg.policies):
            s = cfg.sched
            rows = max(list(cfg.concurrency) + ([cfg.load.max_batch] if cfg.load.rates else []))
            self.cost = step_cost_profile(target, rows, cfg.gamma + 1, s.profile_dir,
                                          context=s.profile_context, repeats=s.profile_repeats,
                                          reprofile=s.reprofile)

    def methods(self) -> list[Method]:
        """At R=1: plain, the configured drafter-free methods, then every trained head under every
        policy (named `dspark` = verify-all, `dspark+sched`, `dspark+threshold`, `dspark+gamma1`, …); a
        `lookup+<policy>` entry adds the head combined with prompt lookup (`dspark+lookup+sched`)."""
        out = [Method()] + [Method(m) for m in self.cfg.methods if m != "plain"]
        return out + [Method(head, policy, combined=combined) for head in self.heads
                      for combined, policy in map(split_policy, self.cfg.policies)]

    def gamma(self, method: Method) -> int:
        """Drafted tokens per step: a trained head's own γ, capped by bench's `gamma` (a drafter is never
        asked for more than it was trained for); bench's `gamma` for the other methods."""
        return min(self.cfg.gamma, self.heads[method.head].config.gamma) if method.trained else self.cfg.gamma

    def level_size(self, r: int) -> int:
        """Prompts run at concurrency r: all, or max(r, prompts_per_level) when that is set."""
        n = self.cfg.get("prompts_per_level")
        return len(self.prompts) if not n else min(len(self.prompts), max(r, int(n)))

    def engine(self, method: Method, record: bool = False) -> Engine:
        c = self.cfg
        drafter, policy = None, None
        if method.head == "oracle":
            drafter = OracleDrafter(self.target, streams=self.streams)
        elif method.head == "prompt_lookup":
            drafter = PromptLookupDrafter(c.prompt_lookup.max_ngram, c.prompt_lookup.min_ngram)
        elif method.trained:
            drafter = drafter_for(self.heads[method.head], self.target, temperature=c.temperature, seed=c.seed,
                                  draft_weights=c.get("draft_weights", "native"),
                                  draft_compile=bool(c.get("draft_compile", False)))
            if method.combined == "lookup":
                drafter = CombinedDrafter(drafter, c.prompt_lookup.max_ngram, c.prompt_lookup.min_ngram,
                                          head_cost=c.prompt_lookup.get("head_cost"))
            policy = make_policy(method.policy, self.cost, threshold=c.threshold, unit=c.sched.unit, packed=c.packed)
        return Engine(self.target, drafter, policy=policy, gamma=self.gamma(method), temperature=c.temperature,
                      top_p=c.top_p, record_margins=record, packed=c.packed)

    def warm_up(self) -> None:
        Engine(self.target).generate(self.prompts[:1], 4)

    def plain_reference(self):
        """Plain greedy over every prompt at R=1, recording logit margins: what every row is compared with."""
        engine = self.engine(Method(), record=True)
        stats, outputs, states = Stats(gamma=max(self.cfg.gamma, 1)), [], []
        for start in tqdm(range(len(self.prompts)), desc="plain reference", unit="prompt", leave=False):
            res = self._generate(engine, Method(), self.prompts[start:start + 1], start)
            stats.absorb(res.stats)
            outputs += res.outputs
            states += res.states
        self.margins = [s.margins for s in states]
        self.streams = {i: list(o) for i, o in enumerate(outputs)}
        return stats, outputs

    def measure_level(self, methods: list[Method]) -> dict:
        """Methods of one concurrency r, interleaved batch by batch (each batch of prompts runs under
        every method before the next batch starts), so load that drifts during the run hits all
        methods alike and the ratios stay fair. Returns method → (Stats, outputs in prompt order)."""
        r = methods[0].concurrency
        engines = {m: None if m.hugging_face else self.engine(m) for m in methods}
        out = {m: (Stats(gamma=max(self.gamma(m), 1)), []) for m in methods}
        prompts = self.prompts[: self.level_size(r)]
        for start in tqdm(range(0, len(prompts), r), desc=f"R={r}: {len(methods)} methods", unit="batch"):
            batch = prompts[start:start + r]
            for m in methods:
                stats, outputs = out[m]
                if m.hugging_face:
                    s, o = self._hf(m.head, batch)
                    stats.absorb(s)
                    outputs += o
                    continue
                res = self._generate(engines[m], m, batch, start)
                stats.absorb(res.stats)
                outputs += res.outputs
        return out

    def _generate(self, engine: Engine, method: Method, batch: list[list[int]], start: int):
        if method.head == "oracle":   # the oracle's streams are keyed by prompt index
            engine.drafter.streams = {i - start: self.streams[i] for i in range(start, start + len(batch))
                                      if i in self.streams}
        return engine.generate(batch, self.cfg.max_new_tokens, seed=self.cfg.seed + start,
                               eos_token_ids=[] if self.cfg.ignore_eos else None)

    def _hf(self, name: str, prompts: list[list[int]]):
        """Hugging Face `generate` (plain, or prompt lookup) one prompt at a time: the outside baseline."""
        c = self.cfg
        stats, outputs = Stats(gamma=max(c.gamma, 1)), []
        kw = dict(max_new_tokens=c.max_new_tokens, min_new_tokens=c.max_new_tokens if c.ignore_eos else 0,
                  eos_token_id=self.target.eos_token_ids,
                  pad_token_id=self.target.eos_token_ids[0])
        kw.update(dict(do_sample=True, temperature=c.temperature, top_p=c.top_p) if c.temperature > 0
                  else dict(do_sample=False))
        if name == "hf_prompt_lookup":
            kw["prompt_lookup_num_tokens"] = c.gamma
        for p in prompts:
            ids = torch.tensor([p], device=self.target.device)
            t = time.perf_counter()
            with torch.no_grad():
                out = self.target.hf_generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, len(p):].tolist()
            dt = time.perf_counter() - t
            stats.wall += dt
            stats.tokens += len(out)
            stats.requests += 1
            stats.per_user_tps.append(len(out) / dt)
            outputs.append(out)
        return stats, outputs

    def row(self, stats: Stats, outputs, reference, plain_stats: Stats) -> dict:
        s = stats.summary()
        if stats.forwards == 0:   # Hugging Face rows: no runtime internals to report
            s.update(tau=None, acceptance_by_position=[], acceptance_rate=None)
        s["speedup_vs_plain"] = s["tokens_per_s"] / max(plain_stats.summary()["tokens_per_s"], 1e-9)
        s.update(self.exactness(outputs, reference))
        return s

    def exactness(self, outputs, reference) -> dict:
        """Output i against plain greedy reference[i % n] (a request set may cycle the prompts): whether all
        match, and the plain run's top-1/top-2 logit margin at each first divergence (docs/design.md §5).
        All None when sampling."""
        if self.cfg.temperature > 0:
            return dict(identical_to_plain=None, exact_match_rate=None, max_divergence_margin=None, divergences=None)
        n, margins = len(reference), []
        for i, out in enumerate(outputs):
            ref, known = reference[i % n], self.margins[i % n]
            if out != ref:
                j = next((k for k, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
                margins.append(known[j] if j < len(known) else float("inf"))
        return dict(identical_to_plain=not margins, exact_match_rate=1 - len(margins) / max(len(outputs), 1),
                    max_divergence_margin=max(margins) if margins else None, divergences=len(margins),
                    divergences_all_near_ties=all(m <= self.cfg.near_tie_margin for m in margins))
