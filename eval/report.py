"""Bench reports: the Markdown tables, the load summary (throughput vs per-user speed), the arrivals
table and the PNGs."""
from __future__ import annotations

from pathlib import Path

from dspark.core.methods import Method


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    head = ("| method | tok/s | decode tok/s | per-user tok/s | speedup vs plain | τ | verified/step | accept rate "
            "| exact match | max div. margin | ms/step draft / verify / other |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"{report['target']} ({report['dtype']}), {report['prompts']} {report['prompt_set']} prompts, "
             f"max_new_tokens {report['max_new_tokens']}, T={report['temperature']}, γ={report['gamma']}, "
             f"{report['machine']}", "", head]
    for name, m in report["methods"].items():
        steps = max(m["target_forwards"], 1)
        t = m["time_s"]
        split = (f"{1e3 * t['draft'] / steps:.1f} / {1e3 * t['verify'] / steps:.1f} / {1e3 * t['other'] / steps:.1f}"
                 if m["target_forwards"] else "–")
        verified = m["verified_per_step"] if m["target_forwards"] else None
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['decode_tokens_per_s']:.1f} | "
                     f"{m['per_user_tokens_per_s']:.1f} | {m['speedup_vs_plain']:.2f}× | {_fmt(m['tau'], '.2f')} | "
                     f"{_fmt(verified, '.2f')} | {_fmt(m['acceptance_rate'], '.2f')} | "
                     f"{_fmt(m['exact_match_rate'], '.2f')} | {_fmt(m['max_divergence_margin'], '.3f')} | {split} |")
    if report.get("outside_draft_vocab"):
        lines += ["", "Plain output tokens outside each head's draft vocabulary (never draftable): " + ", ".join(
            f"{name} {100 * share:.1f} %" for name, share in report["outside_draft_vocab"].items())]
    load = report.get("load")
    if load:
        lines += ["", "Load: aggregate vs per-user tokens/s per concurrency R", "",
                  "| method | " + " | ".join(f"R={r}" for r in load["levels"]) + " |",
                  "|---|" + "---|" * len(load["levels"])]
        for name, pts in load["curves"].items():
            by_r = {p["concurrency"]: p for p in pts}
            cells = [(f"{by_r[r]['aggregate']:.0f} / {by_r[r]['per_user']:.1f} (τ {_fmt(by_r[r]['tau'], '.2f')}, "
                      f"{_fmt(by_r[r]['verified_per_step'], '.1f')} verified)") if r in by_r else "–"
                     for r in load["levels"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if load.get("matched"):
            base = load["baseline"]
            lines += ["", f"Per-user tokens/s at matched aggregate throughput, relative to {base}", "",
                      "| R of " + base + " | aggregate tok/s | " + " | ".join(load["matched"]["methods"]) + " |",
                      "|---|---|" + "---|" * len(load["matched"]["methods"])]
            for row in load["matched"]["rows"]:
                cells = [_fmt(row["ratio"].get(m), ".2f") + ("×" if row["ratio"].get(m) is not None else "")
                         for m in load["matched"]["methods"]]
                lines.append(f"| {row['concurrency']} | {row['aggregate']:.0f} | " + " | ".join(cells) + " |")
    if report.get("arrivals"):
        lines += arrivals_markdown(report["arrivals"])
    return "\n".join(lines)


def arrivals_markdown(a: dict) -> list[str]:
    """The arrivals table (eval/arrivals.py): per method and rate, then sched vs gamma1."""
    lines = ["", f"Arrivals: {a['requests']} requests per rate (Poisson, seed {a['seed']}), at most "
             f"{a['max_batch']} at once; latency = finished − arrival, queue = admitted − arrival", "",
             "| method | rate req/s | tok/s | per-user tok/s | latency mean / p90 s | queue s | TTFT s | τ "
             "| identical |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in a["methods"].items():
        for p in row["points"]:
            same = {True: "yes", False: f"no ({p['divergences']})", None: "–"}[p["identical_to_plain"]]
            lines.append(f"| {name} | {p['rate']:g} | {p['tokens_per_s']:.1f} | {p['per_user_tokens_per_s']:.1f} | "
                         f"{p['mean_latency_s']:.2f} / {p['p90_latency_s']:.2f} | {p['mean_queue_s']:.2f} | "
                         f"{p['mean_ttft_s']:.2f} | {p['tau']:.2f} | {same} |")
    for cmp in a.get("sched_vs_gamma1") or []:
        lines += ["", f"{cmp['sched']} vs {cmp['gamma1']} under arrivals: per-user tokens/s ratio at the same rate, "
                  f"and at {cmp['gamma1']}'s aggregate throughput ({cmp['sched']}'s curve interpolated)", "",
                  "| rate req/s | gamma1 tok/s | gamma1 per-user | sched tok/s | sched per-user | same rate "
                  "| matched throughput |", "|---|---|---|---|---|---|---|"]
        for r in cmp["rows"]:
            m = r["ratio_matched_throughput"]
            matched = "–" if m is None else f"{m:.2f}×"
            lines.append(f"| {r['rate']:g} | {r['gamma1_tokens_per_s']:.1f} | {r['gamma1_per_user']:.1f} | "
                         f"{r['sched_tokens_per_s']:.1f} | {r['sched_per_user']:.1f} | {r['ratio_same_rate']:.2f}× "
                         f"| {matched} |")
    return lines


def load_summary(report: dict) -> dict:
    """Per method (named as at R=1), its (aggregate, per-user) point at every concurrency; and, against
    the first method under policy `gamma1` (MTP-1-like), each method's per-user speed interpolated at the
    baseline's aggregate throughput (None where the method's frontier does not reach that throughput)."""
    curves: dict[str, list[dict]] = {}
    policies: dict[str, str | None] = {}
    for key, m in report["methods"].items():
        if m.get("tau") is None:        # Hugging Face rows run at R=1 only
            continue
        method = Method.of_row(key, m)
        base = method.at(1).name
        policies[base] = method.policy
        curves.setdefault(base, []).append({
            "concurrency": method.concurrency, "aggregate": m["tokens_per_s"],
            "per_user": m["per_user_tokens_per_s"], "tau": m["tau"], "verified_per_step": m["verified_per_step"]})
    levels = sorted({p["concurrency"] for pts in curves.values() for p in pts})
    out = {"levels": levels, "curves": curves}
    baseline = next((b for b in curves if policies[b] == "gamma1"), None)
    if baseline:
        others = [b for b in curves if b != baseline]
        rows = []
        for p in sorted(curves[baseline], key=lambda q: q["concurrency"]):
            ratio = {}
            for b in others:
                u = per_user_at(curves[b], p["aggregate"])
                ratio[b] = None if u is None else u / p["per_user"]
            rows.append({"concurrency": p["concurrency"], "aggregate": p["aggregate"], "ratio": ratio})
        out.update(baseline=baseline, matched={"methods": others, "rows": rows})
    return out


def per_user_at(points: list[dict], aggregate: float) -> float | None:
    """Linear interpolation of per-user speed at an aggregate throughput along a method's curve."""
    pts = sorted(points, key=lambda p: p["aggregate"])
    for a, b in zip(pts, pts[1:]):
        if a["aggregate"] <= aggregate <= b["aggregate"]:
            w = (aggregate - a["aggregate"]) / max(b["aggregate"] - a["aggregate"], 1e-9)
            return a["per_user"] + w * (b["per_user"] - a["per_user"])
    if pts and abs(pts[0]["aggregate"] - aggregate) <= 1e-9 * max(aggregate, 1):
        return pts[0]["per_user"]
    return None


def write_plots(report: dict, out_dir: Path) -> dict:
    """acceptance_by_position.png (R=1 drafters), with several R frontier.png, with arrivals arrivals.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    methods = {k: Method.of_row(k, m) for k, m in report["methods"].items()}
    rows = {k: m for k, m in report["methods"].items()
            if methods[k].concurrency == 1 and m.get("tau") is not None and m.get("drafted")}
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, m in rows.items():
            acc = m["acceptance_by_position"]
            ax.plot(range(1, len(acc) + 1), acc, "o-", ms=3, label=name)
        ax.set_xlabel("block position k")
        ax.set_ylabel("P(accept k | 1..k−1 accepted)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{report['target']} · {report['prompt_set']} · γ={report['gamma']}", fontsize=9)
        ax.legend(fontsize=7)
        paths["acceptance_by_position"] = _save(fig, out_dir / "acceptance_by_position.png")
    levels = sorted({m.concurrency for m in methods.values()})
    if len(levels) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        curves = load_summary(report)["curves"]
        for name, pts in curves.items():
            pts = sorted(pts, key=lambda p: p["concurrency"])
            ax.plot([p["aggregate"] for p in pts], [p["per_user"] for p in pts], "o-", ms=3, label=name)
            for p in pts:
                ax.annotate(f"R{p['concurrency']}", (p["aggregate"], p["per_user"]), fontsize=6)
        ax.set_xlabel("aggregate tokens/s")
        ax.set_ylabel("per-user tokens/s")
        ax.set_title("throughput vs per-user speed (up and right is better)", fontsize=9)
        ax.legend(fontsize=7)
        paths["frontier"] = _save(fig, out_dir / "frontier.png")
    if report.get("arrivals"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, row in report["arrivals"]["methods"].items():
            pts = row["points"]
            ax.plot([p["tokens_per_s"] for p in pts], [p["per_user_tokens_per_s"] for p in pts], "o-", ms=3, label=name)
            for p in pts:
                ax.annotate(f"{p['rate']:g}/s", (p["tokens_per_s"], p["per_user_tokens_per_s"]), fontsize=6)
        ax.set_xlabel("aggregate tokens/s")
        ax.set_ylabel("per-user tokens/s")
        ax.set_title(f"Poisson arrivals ({report['arrivals']['requests']} requests per rate, "
                     f"≤ {report['arrivals']['max_batch']} at once)", fontsize=9)
        ax.legend(fontsize=7)
        paths["arrivals"] = _save(fig, out_dir / "arrivals.png")
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path)
