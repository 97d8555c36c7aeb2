"""The one training loop (accelerate). Objectives plug in through `forward_loss` (objectives.py).

Data order is a seeded permutation per epoch, sharded across ranks by hand, and anchors are drawn
from a generator seeded by (seed, rank, micro-step): a run resumed from a checkpoint (accelerate
`save_state`: weights, optimizer, scheduler, RNG) replays exactly the batches and anchors the
uninterrupted run would have seen, so its loss curve is the same.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import OmegaConf
from tqdm import tqdm

from dspark.core.errors import DSparkError
from dspark.core.files import write_json_atomic
from dspark.data.dataset import greedy_regenerated, load_rows, responses_of, split
from dspark.models.target import load_target

from .data import FeatureSource, cache_files, check_store_dir, collate
from .init import initial_head
from .losses import expected_tau, lr_factor
from .objectives import OBJECTIVES

# The checkpoints folder belongs to one run: every checkpoint records the run's settings (the resolved
# config minus the keys below) and `resume=true` continues only a run with the same ones. The keys below
# may change between a run and its resumption: how long it runs, how it logs, validates and saves, how
# target features are obtained, and where files live (output_dir and the paths derived from it; the
# dataset is compared by its identity, datasets' fingerprint in state.json, so a moved folder still
# resumes and a regenerated dataset does not). Everything else (target, draft, optim, loss, seed, data
# selection, max_steps: the LR schedule depends on it) must match.
RESUMABLE_KEYS = frozenset({"resume", "stop_after_steps", "max_minutes", "eval_every", "val_walk_rows", "save_every",
                            "keep_checkpoints", "logger", "features", "features_dir", "features_memory_gb",
                            "feature_batch_size", "features_dtype", "output_dir", "data_dir", "target.cache_dir",
                            "hydra"})


def run_settings(cfg) -> dict:
    """What the run computes, as {dotted key: value} (kept in each checkpoint's trainer_state.json)."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if f"{prefix}{k}" in RESUMABLE_KEYS:
                continue
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk({k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
          for k, v in cfg.items() if k not in RESUMABLE_KEYS}, "")
    try:
        flat["dataset_fingerprint"] = json.loads((Path(cfg.data_dir) / "state.json").read_text()).get("_fingerprint")
    except (OSError, ValueError):
        flat["dataset_fingerprint"] = None
    return json.loads(json.dumps(flat, default=str))   # as read back from the json


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        cuda = torch.cuda.is_available()
        self.acc = Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum,
                               mixed_precision="bf16" if cuda and cfg.bf16_autocast else "no",
                               kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                               # batches are sharded by hand (_epoch_batches): accelerate must not step the LR
                               # schedule num_processes times per optimizer step; fit() steps it once
                               step_scheduler_with_optimizer=False,
                               log_with="wandb" if cfg.logger.name == "wandb" else None)
        set_seed(cfg.seed)
        self.out = Path(cfg.output_dir)
        self.settings = run_settings(cfg)
        self.resume_from = self._check_checkpoints()   # refusals first: before anything is loaded or written
        self.last_ckpt = self.resume_from
        if cfg.features == "cache":
            cache_files(cfg.features_dir, required=True)
        if cfg.features == "store":
            check_store_dir(cfg.features_dir)
        self.target = load_target(cfg.target, device=self.acc.device)
        rows = load_rows(cfg.data_dir, cfg.max_seq_len, self.target.vocab_size, target=self.target.name)
        self.train_rows, self.val_rows = split(rows, cfg.val_fraction)
        if cfg.val_data_dir:   # validate on another dataset's held-out rows; their prompts are never trained on
            _, self.val_rows = split(load_rows(cfg.val_data_dir, cfg.max_seq_len, self.target.vocab_size,
                                               target=self.target.name), cfg.val_fraction)
            held = {r["prompt_id"] for r in self.val_rows}
            self.train_rows = [r for r in self.train_rows if r["prompt_id"] not in held]
            if not self.train_rows:
                raise DSparkError(f"every training prompt of {cfg.data_dir} is held out in {cfg.val_data_dir}: "
                                  "use another val_data_dir or a larger dataset")
        # the walk τ takes the rows' tokens as the target's greedy choices: greedy self-distilled rows only
        self.walk_rows = self.val_rows[:cfg.val_walk_rows] if greedy_regenerated(cfg.val_data_dir or cfg.data_dir) \
            else []
        head, self.init_from = initial_head(cfg, self.target, self.train_rows,
                                            say=tqdm.write if self.acc.is_main_process else lambda _: None)
        self.head = head.to(self.acc.device)
        c = self.head.config
        self.features = FeatureSource(self.target, c.target_layer_ids, cfg.features_dir, cfg.features,
                                      cfg.features_dtype)
        self._maybe_precompute()
        o = cfg.optim
        lr = o.warm_start_lr if self.init_from and o.get("warm_start_lr") else o.lr
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.total_steps = cfg.max_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, o.warmup_steps, self.total_steps, o.min_lr_ratio))
        self.model, self.opt, self.sched = self.acc.prepare(self.head, self.opt, self.sched)
        loss = OmegaConf.to_container(cfg.loss, resolve=True)
        if loss.get("labels") is None:   # original answers are labelled by the target; regenerated ones are its own
            loss["labels"] = "target" if responses_of(cfg.data_dir) == "original" else "data"
            if loss["labels"] == "target" and self.acc.is_main_process:
                tqdm.write("note: a dataset of original answers: the CE labels are the target's argmax "
                           "(loss.labels=target)")
        kind = OBJECTIVES[self.head.architecture]
        self.objective = kind(self.model, self.target, self.features, cfg.anchors_per_seq, loss, cfg.keep_target_stats)
        self.val_objective = kind(self.model, self.target, self.features, cfg.val_anchors_per_seq, loss,
                                  cfg.keep_target_stats)
        self.state = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "seconds": 0.0, "positions": 0, "curve": []}

    def _maybe_precompute(self) -> None:
        """Where target features come from (train/data.py FeatureSource.prepare); a store is built here."""
        cfg, acc = self.cfg, self.acc
        self.features.prepare(self.train_rows + self.val_rows, cfg.features_memory_gb, cfg.feature_batch_size,
                              acc.process_index, acc.num_processes, acc.wait_for_everyone, acc.is_main_process)

    # ------------------------------------------------------------------ data order
    def _epoch_batches(self, epoch: int) -> list[list[dict]]:
        """This rank's micro-batches of an epoch (same global order on every rank)."""
        w, r, bs = self.acc.num_processes, self.acc.process_index, self.cfg.batch_size
        order = torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        per_step = bs * w
        n = max(len(order) // per_step, 1)
        order = order.repeat(-(-n * per_step // len(order)))[:n * per_step]   # tiny data: wrap around
        return [[self.train_rows[i] for i in order[k * per_step + r * bs:k * per_step + (r + 1) * bs]]
                for k in range(n)]

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        if self.resume_from:
            self._resume(self.resume_from)
        cfg, acc, st = self.cfg, self.acc, self.state
        if acc.is_main_process and cfg.logger.name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            acc.init_trackers(cfg.logger.project, config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": {"dir": str(self.out), "name": self.out.name}})
        budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        bar = tqdm(total=cfg.max_steps, initial=st["step"], desc=f"train {self.head.config.kind}", unit="step",
                   disable=not acc.is_main_process)
        t_start, base_seconds = time.perf_counter(), st["seconds"]
        window = {"loss": 0.0, "count": 0.0}
        # nothing left to do (a finished run resumed; max_steps < 1): no step beyond max_steps
        stop = (st["step"] >= cfg.max_steps or st["seconds"] >= budget
                or bool(cfg.stop_after_steps and st["step"] >= cfg.stop_after_steps))
        while not stop:
            batches = self._epoch_batches(st["epoch"])
            for bi in range(st["batch"], len(batches)):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + acc.process_index * 7919 + st["micro"])
                with acc.accumulate(self.model):
                    loss_sum, count, _ = self.objective.forward_loss(collate(batches[bi]), gen, self.head)
                    both = acc.gather(torch.stack([count.float(), loss_sum.detach().float()]).reshape(1, 2)).sum(0)
                    total = both[0].clamp_min(1)
                    loss = loss_sum * acc.num_processes / total
                    if not torch.isfinite(loss):
                        raise DSparkError(self._nan_message())
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.grad_clip:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                    self.opt.step()
                    if acc.sync_gradients:
                        self.sched.step()
                    self.opt.zero_grad()
                st["micro"] += 1
                st["batch"] = bi + 1
                st["positions"] += int(total.item())
                window["loss"] += float(both[1])
                window["count"] += float(total)
                if not acc.sync_gradients:
                    continue
                st["step"] += 1
                st["seconds"] = base_seconds + time.perf_counter() - t_start
                train_loss = window["loss"] / max(window["count"], 1)
                window = {"loss": 0.0, "count": 0.0}
                st["train_loss"] = train_loss
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", pos_s=f"{self._rate():.0f}")
                acc.log({"train/loss": train_loss, "lr": self.sched.get_last_lr()[0]}, step=st["step"])
                last = st["step"] >= cfg.max_steps or st["seconds"] >= budget
                if st["step"] % cfg.eval_every == 0 or last:
                    self._validate()
                if cfg.save_every and (st["step"] % cfg.save_every == 0 or last):
                    self._checkpoint()
                if last or (cfg.stop_after_steps and st["step"] >= cfg.stop_after_steps):
                    stop = True
                    break
            else:
                st["epoch"], st["batch"] = st["epoch"] + 1, 0
        bar.close()
        summary = self._finish()
        acc.end_training()   # also tears down the process group: last
        return summary

    def _rate(self) -> float:
        """Training positions per second of training time (validation excluded)."""
        st = self.state
        return st["positions"] / max(st["seconds"] - st.get("val_seconds", 0.0), 1e-9)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> None:
        st, t0 = self.state, time.perf_counter()
        # every rank runs the forwards (under FSDP each one gathers the shards: a collective); rank 0 records
        self.head.eval()
        sums = {"loss": 0.0, "ce": 0.0, "l1": 0.0, "bce": 0.0, "count": 0.0}
        taus, greedy_taus, accept, greedy = [], [], [], []
        obj = self.val_objective
        for i in range(0, len(self.val_rows), self.cfg.batch_size):
            batch = collate(self.val_rows[i:i + self.cfg.batch_size])
            gen = torch.Generator().manual_seed(self.cfg.seed + i)   # the same anchors every time
            _, _, out = obj.forward_loss(batch, gen, self.head)
            for k in sums:
                sums[k] += float(out[k])
            keep = out["valid"][:, 0]
            taus.append(expected_tau(out["accept"], out["valid"])[keep])
            greedy_taus.append(expected_tau(out["greedy"], out["valid"])[keep])
            accept.append(out["accept"][keep] * out["valid"][keep])
            greedy.append(out["greedy"][keep])
        walked = [obj.walk(collate([row]), self.head, self.cfg.val_anchors_per_seq) for row in self.walk_rows]
        n = max(sums["count"], 1)
        acc_k = torch.cat(accept)
        g_k = torch.cat(greedy).float()
        reached = torch.cumprod(torch.cat([torch.ones(len(g_k), 1), g_k[:, :-1]], 1), 1)
        point = {"step": st["step"], "minutes": st["seconds"] / 60, "positions": st["positions"],
                 "train_loss": st.get("train_loss"), "val_loss": sums["loss"] / n, "val_ce": sums["ce"] / n,
                 "val_l1": sums["l1"] / n, "val_bce": sums["bce"] / n,
                 "val_tau": float(torch.cat(taus).mean()), "val_tau_greedy": float(torch.cat(greedy_taus).mean()),
                 **({"val_tau_walk": sum(t for t, _ in walked) / max(sum(s for _, s in walked), 1)} if walked else {}),
                 "val_acceptance_by_position": acc_k.mean(0).tolist(),
                 "val_greedy_acceptance_by_position":
                     ((g_k * reached).sum(0) / reached.sum(0).clamp_min(1)).tolist()}
        if self.acc.is_main_process:
            st["curve"].append(point)
            tqdm.write(f"step {st['step']}: val loss {point['val_loss']:.3f}  expected τ {point['val_tau']:.3f} "
                       f"(greedy {point['val_tau_greedy']:.3f}, walk {point.get('val_tau_walk', float('nan')):.3f})  "
                       f"{self._rate():.0f} training positions/s")
        self.acc.log({f"val/{k[4:]}": v for k, v in point.items() if k.startswith("val_") and
                      not isinstance(v, list)}, step=st["step"])
        self.head.train()
        self.acc.wait_for_everyone()
        spent = time.perf_counter() - t0
        st["val_seconds"] = st.get("val_seconds", 0.0) + spent
        st["seconds"] += spent   # wall time includes every validation, the last one too (the next step recounts it)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        root = self.out / "checkpoints"
        tmp = root / f".tmp-step-{self.state['step']}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()   # every rank's files (random_states_<rank>.pkl, FSDP shards) are in tmp
        if self.acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({**self.state, "settings": self.settings}))
            final = root / f"step-{self.state['step']:07d}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(root.glob("step-*"))[:-self.cfg.keep_checkpoints]:   # all this run's (_check_checkpoints)
                shutil.rmtree(old, ignore_errors=True)
        self.last_ckpt = self.out / "checkpoints" / f"step-{self.state['step']:07d}"
        self.acc.wait_for_everyone()

    def _latest(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step-*"))
        return found[-1] if found else None

    def _check_checkpoints(self) -> Path | None:
        """The checkpoint to resume from (None for a fresh run), or one DSparkError: a fresh run never writes
        into (or rotates away) another run's checkpoints, and resume=true continues only a run with the same
        settings. Reads only, so a refused run leaves output_dir as it was."""
        root, latest = self.out / "checkpoints", self._latest()
        if not self.cfg.resume:
            if latest:
                raise DSparkError(f"{root} holds the checkpoints of an earlier run (latest {latest.name}): "
                                  "resume=true continues it; pass a new output_dir= to start over")
            return None
        if latest is None:
            raise DSparkError(f"resume=true but no checkpoint in {root}: start without resume=true")
        saved = json.loads((latest / "trainer_state.json").read_text()).get("settings")
        if saved is None:   # written before checkpoints recorded their settings
            if self.acc.is_main_process:
                tqdm.write(f"note: {latest} records no settings; resuming without comparing them")
        # a setting added since the checkpoint was written counts as unchanged while it is null (its default)
        elif diff := ", ".join(f"{k}: {saved.get(k, '(unset)')!r} -> {self.settings.get(k, '(unset)')!r}"
                               for k in sorted(saved.keys() | self.settings.keys())
                               if saved.get(k) != self.settings.get(k)):
            raise DSparkError(f"resume=true but {latest} was written with other settings ({diff}): resume with the "
                              "same settings, or pass a new output_dir= to start over")
        return latest

    def _resume(self, ckpt: Path) -> None:
        self.acc.load_state(str(ckpt))
        self.state = json.loads((ckpt / "trainer_state.json").read_text())
        self.state.pop("settings", None)
        tqdm.write(f"resumed from {ckpt} (step {self.state['step']})")

    def _nan_message(self) -> str:
        ckpt = self.last_ckpt   # this run's (or the one it resumed), never an older run's
        keep = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        return (f"loss became NaN/inf at step {self.state['step']}; {keep}. Lower optim.lr or check the data, "
                "then rerun (resume=true continues from the checkpoint)")

    # ------------------------------------------------------------------ outputs
    def _finish(self) -> dict:
        st, c = self.state, self.head.config
        summary = {}
        weights = self.acc.get_state_dict(self.model)   # collective under FSDP; the plain state dict otherwise
        if self.acc.is_main_process:
            tmp = self.out / ".head.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.head.save_pretrained(tmp, state_dict=weights)
            shutil.rmtree(self.out / "head", ignore_errors=True)
            os.replace(tmp, self.out / "head")
            final = st["curve"][-1] if st["curve"] else {}
            summary = {
                "objective": c.kind, "draft": self.cfg.draft.name, "target": self.target.name,
                "trainable_params": self.head.num_trainable(), "draft_vocab_size": c.draft_vocab_size,
                "gamma": c.gamma, "init_from": self.init_from, "steps": st["step"], "wall_s": st["seconds"],
                "val_s": st.get("val_seconds", 0.0), "train_positions": st["positions"],
                "positions_per_s": st["positions"] / max(st["seconds"] - st.get("val_seconds", 0.0), 1e-9),
                "train_rows": len(self.train_rows), "val_rows": len(self.val_rows), "features": self.features.mode,
                "processes": self.acc.num_processes, "train_loss": st.get("train_loss"),
                **{k: v for k, v in final.items() if k.startswith("val_")},
                "head": str(self.out / "head"), "curve": st["curve"],
            }
            write_json_atomic(self.out / "train.json", summary)
            v = {k: summary.get(k, float("nan")) for k in ("val_loss", "val_tau", "val_tau_greedy", "val_tau_walk")}
            print(f"trained {c.kind} head ({summary['trainable_params'] / 1e6:.2f}M params) for {st['step']} steps "
                  f"in {st['seconds']:.0f}s: val loss {v['val_loss']:.3f}, expected τ {v['val_tau']:.3f} (greedy "
                  f"{v['val_tau_greedy']:.3f}, walk {v['val_tau_walk']:.3f}); head → {self.out / 'head'}")
        self.acc.wait_for_everyone()
        return summary


def run(cfg) -> dict:
    summary = Trainer(cfg).fit()
    return {"val_tau": summary.get("val_tau")}
