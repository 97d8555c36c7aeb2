"""The model card (README.md) of an exported head, written from the run's measured json files.

Every number comes from `bench.json`, `train.json`, `calibrate.json` or `generate.json`; a section
whose file is missing is left out rather than filled with placeholders. The YAML header is the Hub's
model-card metadata (library, tags, base model, model-index with the measured metrics).
"""
from __future__ import annotations

import yaml

from dspark.core.methods import Method, head_row, records

TAGS = ["speculative-decoding", "dspark", "draft-model"]


def _f(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def render(head_cfg: dict, target: dict, results: dict, usage_ref: str, dtype: str, name: str,
           vllm: bool = True) -> str:
    """head_cfg: the exported config.json; target: {id, revision, name, source, cli}; results:
    {bench: [json…], train, calibrate, generate} (None / [] where absent); usage_ref: what to pass
    as head= (repo id or folder); name: the model-index name; vllm: the serving folders are written."""
    kind = ("EAGLE-3" if head_cfg.get("model_type") == "eagle3" else
            "DFlash" if head_cfg.get("sequential_head") == "none" else "DSpark")
    title = target.get("id") or target.get("name")
    parts = [_header(head_cfg, target, results, name, kind),
             f"# {kind} draft head for {title}\n",
             _intro(head_cfg, target, kind)]
    for bench in results.get("bench") or []:
        parts.append(_bench(bench, kind.lower().replace("-", "")))
    if results.get("calibrate"):
        parts.append(_calibration(results["calibrate"]))
    if results.get("train") or results.get("generate"):
        parts.append(_training(results.get("train"), results.get("generate")))
    parts += [_head(head_cfg, dtype), _usage(target, usage_ref), _files(vllm, kind), _limitations(target, results)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _header(c: dict, target: dict, results: dict, name: str, kind: str) -> str:
    method = kind.lower().replace("-", "")
    meta = {"library_name": "dspark", "tags": TAGS + ([method] if method != "dspark" else [])}
    if target.get("id"):
        meta["base_model"] = target["id"]
    index = []
    for b in results.get("bench") or []:
        row = head_row(b, method)
        if row:
            metrics = [{"type": "tau", "name": "tokens per target forward (τ)", "value": round(row["tau"], 4)}
                       if row.get("tau") is not None else None,
                       {"type": "speedup", "name": "speedup vs plain decoding",
                        "value": round(row["speedup_vs_plain"], 4)}]
            index.append({"task": {"type": "text-generation", "name": "speculative decoding"},
                          "dataset": {"type": b.get("prompt_set", "prompts"),
                                      "name": f"{b.get('prompt_set')} ({b.get('prompts')} prompts)"},
                          "metrics": [m for m in metrics if m]})
    t = results.get("train") or {}
    if t.get("val_tau") is not None:
        index.append({"task": {"type": "text-generation", "name": "speculative decoding"},
                      "dataset": {"type": "self-distilled", "name": "held-out self-distilled answers"},
                      "metrics": [{"type": "expected_tau", "name": "expected τ (sampling)",
                                   "value": round(t["val_tau"], 4)}]
                      + [{"type": key, "name": name, "value": round(t[k], 4)}
                         for k, key, name in (("val_tau_greedy", "greedy_tau", "greedy τ"),
                                              ("val_tau_walk", "walk_tau", "greedy runtime τ (walk)"))
                         if t.get(k) is not None]})
    if index:
        meta["model-index"] = [{"name": name, "results": index}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _intro(c: dict, target: dict, kind: str) -> str:
    if kind == "EAGLE-3":
        return (f"An EAGLE-3 drafter (one autoregressive layer over the target's hidden states at layers "
                f"{c.get('target_layer_ids')}) for speculative decoding of `{target.get('id') or target.get('name')}`, "
                "trained with dspark on answers the target generated itself (the baseline DSpark is compared "
                "with). The target verifies every draft, so the output is the target's own (lossless).\n")
    seq = {"markov": f"a Markov chunk head (rank {c.get('head_rank')})",
           "rnn": f"a gated-RNN chunk head (width {c.get('head_rank')})"}.get(c.get("sequential_head"))
    body = (f"A {kind} drafter for speculative decoding of `{target.get('id') or target.get('name')}`, trained "
            "with dspark on answers the target generated itself. From the target's hidden "
            f"states at layers {c.get('target_layer_ids')} it drafts a block of γ={c.get('gamma')} tokens in one "
            f"pass of a {c.get('num_layers')}-layer parallel backbone"
            + (f", then {seq} corrects each position for the token drafted before it" if seq else "")
            + ", and a confidence head estimates each token's chance to survive verification. The target "
            "verifies every block, so the output is the target's own (lossless).")
    if target.get("source"):
        body += f"\n\nTrained against the target as loaded from `{target['source']}`."
    return body + "\n"


def _bench(b: dict, head_method: str) -> str:
    methods = b.get("methods") or {}
    if not methods:
        return ""
    setting = (f"`dspark bench`, {b.get('prompts')} {b.get('prompt_set')} prompts, max_new_tokens "
               f"{b.get('max_new_tokens')}, temperature {b.get('temperature')}, γ={b.get('gamma')}, target "
               f"{b.get('target')} ({b.get('dtype')})")
    if b.get("policies"):
        setting += f", verification policies {', '.join(f'`{x}`' for x in b['policies'])} (`+sched` rows: confidence scheduler)"
    lines = [f"## Results: {b.get('prompt_set')}\n", f"Measured with {setting} on `{b.get('machine')}`. "
             "Speedups are tokens/s ratios against plain decoding measured side by side in the same run "
             "(`bench.json`).\n",
             "| method | τ | speedup vs plain | tokens/s | exact match vs plain |", "|---|---|---|---|---|"]
    this = Method(head_method, "all")
    rows = records(b)
    for method, m in rows.items():
        name = method.name
        label = f"**{name}** (this head)" if method == this else name
        lines.append(f"| {label} | {_f(m.get('tau'))} | {_f(m.get('speedup_vs_plain'))}× | "
                     f"{_f(m.get('tokens_per_s'), '.1f')} | {_f(m.get('exact_match_rate'))} |")
    if this not in rows:
        lines.append(f"\nThis bench run has no `{head_method}` row (the head was not benchmarked in it).")
    if Method("oracle") in rows:
        lines.append("\n`oracle` proposes the target's own continuation at zero cost: the ceiling at this γ.")
    others = sorted({r.head for r in rows if r.trained and ":" in r.head})   # extra heads are named <kind>:<folder>
    if others:
        lines.append(f"\nRows {', '.join(f'`{n}`' for n in others)}: other heads benchmarked in the same run "
                     "(`extra_heads`, named `<kind>:<folder>`).")
    if all(m.get("divergences_all_near_ties") is True for m in methods.values()):
        lines.append("\nExact match below 1 is bf16 arithmetic, not the method: every divergence from plain decoding "
                     "sits on a near-tie of the target's top two logits (`divergences_all_near_ties` in bench.json).")
    return "\n".join(lines) + "\n"


def _calibration(cal: dict) -> str:
    rows = cal.get("positions") or []
    if not rows:
        return ""
    cols = [("temperature", "temperature", ".3f"), ("ece_before", "ECE before", ".4f"),
            ("ece_after", "ECE after", ".4f"), ("brier_before", "Brier before", ".4f"),
            ("brier_after", "Brier after", ".4f"), ("auroc", "AUROC", ".3f")]
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]
    fit = (f" ({cal['prompts']} held-out prompts, {cal.get('blocks_fit')} blocks fitted, "
           f"{cal.get('blocks_eval')} evaluated)" if cal.get("prompts") is not None else "")
    lines = ["## Calibration\n",
             "Sequential temperature scaling (one temperature per block position, fitted in order on held-out "
             f"data{fit}) of the confidence head's cumulative survival estimate (`calibrate.json`):\n",
             "| position | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, r in enumerate(rows):
        lines.append(f"| {k + 1} | " + " | ".join(_f(r.get(c[0]), c[2]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _training(t: dict | None, g: dict | None) -> str:
    lines = ["## Training\n"]
    if g:
        s = g.get("settings") or {}
        lines.append(f"- Data: {g.get('prompts')} prompts from `{s.get('source')}` answered by the target itself "
                     f"({g.get('tokens')} response tokens, max_new_tokens {s.get('max_new_tokens')}, temperature "
                     f"{s.get('temperature')}); {g.get('heldout')} prompts held out.")
    if t:
        lines.append(f"- Head: `{t.get('objective')}`, draft size `{t.get('draft')}`, "
                     f"{t.get('trainable_params', 0) / 1e6:.2f}M trainable parameters, draft vocabulary "
                     f"{t.get('draft_vocab_size')} tokens, γ={t.get('gamma')}.")
        lines.append(f"- Run: {t.get('steps')} steps in {t.get('wall_s', 0) / 60:.1f} min on {t.get('processes')} "
                     f"process(es), {t.get('train_rows')} training / {t.get('val_rows')} validation rows, "
                     f"{_f(t.get('positions_per_s'), '.0f')} training positions/s.")
        if t.get("init_from"):
            lines.append(f"- Warm start: the run began from the weights and draft vocabulary of `{t['init_from']}`.")
        if t.get("val_tau") is not None:
            walk = f", greedy runtime walk τ {_f(t.get('val_tau_walk'), '.3f')}" if t.get("val_tau_walk") else ""
            lines.append(f"- Held-out expected τ (sampling) {_f(t.get('val_tau'), '.3f')}, greedy τ "
                         f"{_f(t.get('val_tau_greedy'), '.3f')}{walk}, validation loss {_f(t.get('val_loss'), '.3f')}.")
    return "\n".join(lines) + "\n"


def _head(c: dict, dtype: str) -> str:
    if c.get("model_type") == "eagle3":
        return ("## Head\n\n"
                f"- Target layers (hidden_states indices): {c.get('target_layer_ids')}; trained for γ={c.get('gamma')} "
                f"steps; draft vocabulary {c.get('draft_vocab_size')} of {c.get('target_vocab_size')} target tokens.\n"
                f"- Weights: `model.safetensors` in {dtype}; the target's embedding and LM head are not stored.\n")
    temps = c.get("confidence_temperatures") or []
    return ("## Head\n\n"
            f"- Target layers (hidden_states indices): {c.get('target_layer_ids')}; block size γ={c.get('gamma')}; "
            f"backbone layers {c.get('num_layers')}; sequential head `{c.get('sequential_head')}`.\n"
            f"- Draft vocabulary: {c.get('draft_vocab_size')} of {c.get('target_vocab_size')} target tokens; the "
            "target's embedding and LM head are shared and not stored here.\n"
            + (f"- Confidence temperatures (per position): {[round(x, 3) for x in temps]}.\n" if temps else
               "- Confidence head not calibrated (temperatures 1.0).\n")
            + f"- Weights: `model.safetensors` in {dtype}.\n")


def _usage(target: dict, ref: str) -> str:
    tgt = f" {target['cli']}" if target.get("cli") else ""
    return ("## Use it\n\n"
            "With dspark installed (`make setup` in its repository):\n\n"
            "```bash\n"
            f"dspark bench head={ref}{tgt}             # speed table: plain, oracle, this head\n"
            f"dspark bench head={ref}{tgt} prompts=mtbench\n"
            "```\n\n"
            "```python\n"
            "from dspark.hub.io import load_head\n"
            f"head = load_head(\"{ref}\")   # a Hub repo id or a local folder, same code path\n"
            "```\n")


def _files(vllm: bool, kind: str) -> str:
    serving = ("- `vllm/`: the same head in the `speculators` format that vLLM loads (see its README).\n"
               + ("- `sglang/`: the same head in the EAGLE-3 layout SGLang loads.\n" if kind == "EAGLE-3" else ""))
    return ("## Files\n\n"
            "- `config.json`: the drafter configuration (target id and revision, target layer ids, γ, "
            "sizes, calibration temperatures).\n"
            "- `model.safetensors`: the head's weights (no optimizer or training state).\n"
            + (serving if vllm else ""))


def _limitations(target: dict, results: dict) -> str:
    lines = ["## Limitations\n",
             "- The head only works with the target it was trained for (same hidden size, vocabulary and layers).",
             "- Speed depends on the hardware and the verification policy; re-measure with `dspark bench`."]
    if not results.get("bench"):
        lines.append("- No speed measurement was available when this card was written.")
    return "\n".join(lines) + "\n"


def render_vllm(config: dict, bench_rows: list[str]) -> str:
    """README of the vllm/ subfolder: what it is, how to serve it, and what was and was not tested."""
    v = config["speculators_config"]["verifier"]
    kind = config["speculators_model_type"]
    n = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    sglang = (f"python -m sglang.launch_server --model-path {v['name_or_path']} --speculative-algorithm DSPARK "
              f"--speculative-draft-model-path <this folder> --speculative-num-draft-tokens {n + 1}"
              if kind == "dspark" and config.get("markov_rank") else
              f"python -m sglang.launch_server --model-path {v['name_or_path']} --speculative-algorithm EAGLE3 "
              f"--speculative-draft-model-path <export folder>/sglang --speculative-num-steps {n} "
              f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {n + 1}" if kind == "eagle3" else None)
    return (f"# speculators `{kind}` layout\n\n"
            f"The parent folder's head in the `speculators` {config['speculators_version']} format: `config.json` "
            f"(verifier `{v['name_or_path']}`, {n} speculative tokens, draft vocabulary "
            f"{config['draft_vocab_size']}) and `model.safetensors`.\n\n"
            f"**Tested for this layout** (dspark's tests/test_speculators.py, on CPU in fp32, with small heads): "
            f"speculators {config['speculators_version']} loads it with every weight matched by name and shape and "
            "gives the same draft logits and greedy drafts as dspark's own drafter. **Not tested**: vLLM and SGLang "
            "themselves (no GPU where dspark is developed); the commands below follow their documented options.\n\n"
            "```bash\n"
            f"vllm serve {v['name_or_path']} --speculative-config "
            f"'{{\"model\": \"<this folder>\", \"num_speculative_tokens\": {n}}}'\n"
            + (f"{sglang}\n" if sglang else "")
            + "```\n"
            + ("\nMeasured with dspark's own runtime (not vLLM):\n\n" + "\n".join(bench_rows) + "\n"
               if bench_rows else ""))
