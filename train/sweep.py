"""Hydra callback: after `dspark train --multirun …`, one table of every job (sweep.md + sweep.json)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        if int(os.environ.get("RANK", "0")):
            return
        root = Path(config.hydra.sweep.dir)
        rows = []
        for f in sorted(root.glob("*/train.json")):
            d = json.loads(f.read_text())
            rows.append({"run": f.parent.name, "draft": d.get("draft"), "objective": d.get("objective"),
                         "trainable_params": d.get("trainable_params"), "val_loss": d.get("val_loss"),
                         "val_tau": d.get("val_tau"), "val_tau_greedy": d.get("val_tau_greedy"),
                         "wall_s": d.get("wall_s"), "positions_per_s": d.get("positions_per_s")})
        if not rows:
            return
        fmt = (lambda v, f: "–" if v is None else format(v, f))
        lines = ["| run | draft | objective | trainable params | val loss | expected τ | greedy τ | wall s | pos/s |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['draft']} | {r['objective']} | {fmt(r['trainable_params'], ',')} | "
                  f"{fmt(r['val_loss'], '.3f')} | {fmt(r['val_tau'], '.3f')} | {fmt(r['val_tau_greedy'], '.3f')} | "
                  f"{fmt(r['wall_s'], '.0f')} | {fmt(r['positions_per_s'], '.0f')} |" for r in rows]
        (root / "sweep.json").write_text(json.dumps(rows, indent=2))
        (root / "sweep.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"wrote {root / 'sweep.md'}")
