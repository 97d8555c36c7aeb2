"""`dspark calibrate`: observe how the head's drafts survive verification on held-out prompts,
fit Sequential Temperature Scaling (eval/sts.py), write the temperatures into the head's
config.json, and report per-position ECE / Brier before and after, AUROC and a reliability diagram.

Survival is observed in the real runtime (verify-all, the calibration temperature), so the
labels are exactly what the scheduler will face. Temperatures are fitted on half the held-out
prompts and judged on the other half (when there are two or more).

Domains: a dataset made from a prompt mix records each row's source (chat, math, code, …). The
held-out prompts are taken from every source in turn, each source's split in two halves, so one fit
covers every domain, and the report gives ECE per domain: confidences calibrated on chat alone are too
pessimistic on code, where the scheduler then verifies too little.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.core.errors import DSparkError
from dspark.core.files import write_json_atomic
from dspark.data.dataset import load_rows, split
from dspark.hub.io import load_head
from dspark.inference import Engine, drafter_for
from dspark.models.target import check_head_target, load_target

from . import sts


def held_out_prompts(cfg, target) -> dict[str, list[list[int]]]:
    """Domain (the row's source; "" for a dataset that does not record it) → held-out prompt ids, at
    most cfg.max_prompts in all, taken from the domains in turn so each is represented."""
    rows = load_rows(cfg.data_dir, 1 << 30, target.vocab_size, target=target.name)
    _, val = split(rows, cfg.val_fraction)
    pools: dict[str, list[list[int]]] = {}
    for r in val:
        start = r["loss_mask"].index(1) if 1 in r["loss_mask"] else len(r["input_ids"])
        if start > 0:
            pools.setdefault(r["source"], []).append(r["input_ids"][:start])
    if not pools:
        raise DSparkError(f"no held-out prompts in {cfg.data_dir}: generate more data")
    taken = {d: [] for d in sorted(pools)}
    for i in range(max(len(v) for v in pools.values())):
        for d in taken:
            if i < len(pools[d]) and sum(map(len, taken.values())) < cfg.max_prompts:
                taken[d].append(pools[d][i])
    return {d: v for d, v in taken.items() if v}


def observe(head, target, prompts, cfg) -> list[tuple[list[float], int, int]]:
    """Decode the prompts speculatively (verify-all) and record every block's raw confidences,
    verified length and accepted count."""
    engine = Engine(target, drafter_for(head, target, temperature=cfg.temperature, seed=cfg.seed),
                    gamma=head.config.gamma, temperature=cfg.temperature, record_blocks=True)
    blocks = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="decoding held-out prompts", unit="batch"):
        res = engine.generate(prompts[start:start + cfg.batch_size], cfg.max_new_tokens, seed=cfg.seed + start)
        blocks += res.stats.blocks
    return blocks


def run(cfg) -> dict:
    out_dir, head_dir = Path(cfg.output_dir), Path(cfg.head)
    if not (head_dir / "config.json").is_file():
        raise DSparkError(f"no trained head at {head_dir}: run `dspark train` first or pass head=<folder>")
    head = load_head(head_dir)
    check_head_target(head, cfg.target, head_dir)
    if not hasattr(head.config, "confidence_temperatures"):
        raise DSparkError(f"the head at {head_dir} ({type(head).__name__}) has no confidence head to calibrate")
    target = load_target(cfg.target)
    head.config.confidence_temperatures = []          # observe raw confidences
    domains = held_out_prompts(cfg, target)
    n_prompts = sum(map(len, domains.values()))
    torch.manual_seed(cfg.seed)
    split_halves = n_prompts > 1    # each domain's prompts alternate between the fitting and the judging half
    fit_by = {d: observe(head, target, p[0::2] if split_halves else p, cfg) for d, p in domains.items()}
    eval_by = {d: observe(head, target, p[1::2], cfg) if len(p) > 1 else [] for d, p in domains.items()}
    fit_blocks = [b for v in fit_by.values() for b in v]
    eval_blocks = [b for v in eval_by.values() for b in v]
    if not fit_blocks:
        raise DSparkError("the drafter reported no confidences: calibrate needs a DSpark/DFlash head")
    g = head.config.gamma
    z, ver, lab = sts.blocks_to_tensors(fit_blocks, g)
    temps = sts.fit_sts(z, ver, lab, cfg.bins, cfg.min_blocks)
    held_out = bool(eval_blocks)
    judge = sts.blocks_to_tensors(eval_blocks, g) if held_out else (z, ver, lab)
    positions = sts.position_report(*judge, temps, cfg.bins)
    fitted = sts.position_report(z, ver, lab, temps, cfg.bins)
    per_domain = {d: _domain_report(eval_by[d] or fit_by[d], len(domains[d]), g, temps, cfg.bins)
                  for d in domains if eval_by[d] or fit_by[d]}
    _write_temperatures(head_dir, temps)
    plot = out_dir / "reliability.png"
    reliability_diagram(judge, temps, cfg.bins, plot)
    report = {"head": str(head_dir), "target": target.name, "dtype": str(target.dtype).replace("torch.", ""),
              "temperature": cfg.temperature, "gamma": g, "prompts": n_prompts,
              "blocks_fit": len(fit_blocks), "blocks_eval": len(eval_blocks), "held_out": held_out,
              "temperatures": temps, "positions": positions, "positions_fit": fitted,
              "max_ece_after": max((p["ece_after"] for p in positions if p["blocks"]), default=None),
              "domains": per_domain, "reliability_png": str(plot)}
    write_json_atomic(out_dir / "calibrate.json", report)
    print(summary_table(report))
    print(f"temperatures written to {head_dir / 'config.json'}; wrote {out_dir / 'calibrate.json'} and {plot}")
    return {"max_ece_after": report["max_ece_after"]}


def _domain_report(blocks, prompts: int, gamma: int, temps: list[float], bins: int) -> dict:
    """One domain's calibration: the worst position's ECE before and after STS, and position-1 survival."""
    positions = sts.position_report(*sts.blocks_to_tensors(blocks, gamma), temps, bins)
    seen = [p for p in positions if p["blocks"]]
    worst = (lambda key: max((p[key] for p in seen), default=None))
    return {"prompts": prompts, "blocks": len(blocks), "survival_1": positions[0]["survival"],
            "max_ece_before": worst("ece_before"), "max_ece_after": worst("ece_after")}


def _write_temperatures(head_dir: Path, temps: list[float]) -> None:
    path = head_dir / "config.json"
    config = json.loads(path.read_text())
    config["confidence_temperatures"] = [round(t, 6) for t in temps]
    write_json_atomic(path, config)


def summary_table(report: dict) -> str:
    which = "held-out half" if report["held_out"] else "fitting set (too few prompts to hold any out)"
    lines = [f"STS on {report['blocks_fit']} blocks; judged on {report['blocks_eval'] or report['blocks_fit']} "
             f"blocks ({which})", "",
             "| position | blocks | survival | T | ECE before | ECE after | Brier before | Brier after | AUROC |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = (lambda v, spec: "–" if v is None or v != v else format(v, spec))
    for p in report["positions"]:
        lines.append(f"| {p['position']} | {p['blocks']} | {f(p['survival'], '.3f')} | {p['temperature']:.3f} | "
                     f"{f(p['ece_before'], '.3f')} | {f(p['ece_after'], '.3f')} | {f(p['brier_before'], '.3f')} | "
                     f"{f(p['brier_after'], '.3f')} | {f(p['auroc'], '.3f')} |")
    if len(report.get("domains", {})) > 1:
        lines += ["", "| domain | prompts | blocks | position-1 survival | max ECE before | max ECE after |",
                  "|---|---|---|---|---|---|"]
        for d, r in report["domains"].items():
            lines.append(f"| {d or '(unnamed)'} | {r['prompts']} | {r['blocks']} | {f(r['survival_1'], '.3f')} | "
                         f"{f(r['max_ece_before'], '.3f')} | {f(r['max_ece_after'], '.3f')} |")
    return "\n".join(lines)


def reliability_diagram(judge, temps: list[float], bins: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, ver, lab = judge
    g = z.shape[1]
    fig, axes = plt.subplots(1, g, figsize=(2.6 * g, 2.8), squeeze=False)
    for k, ax in enumerate(axes[0]):
        rows = ver[:, k]
        for name, temps_k, style in (("raw", [], "o--"), ("STS", temps, "s-")):
            a = sts.cumulative(z, temps_k)[rows, k]
            y = lab[rows, k]
            idx = (a * bins).long().clamp(0, bins - 1)
            xs, ys = [], []
            for b in range(bins):
                m = idx == b
                if int(m.sum()):
                    xs.append(float(a[m].mean()))
                    ys.append(float(y[m].mean()))
            ax.plot(xs, ys, style, ms=3, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_title(f"position {k + 1}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted prefix survival", fontsize=7)
    axes[0][0].set_ylabel("observed", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
