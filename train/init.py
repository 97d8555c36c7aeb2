"""Where a training run's head starts: from scratch, from a trained head (`init_from=<folder>`), or from
the committed head for its target (`init_from=released`): a warm start continues a head's weights and
draft vocabulary under a new LR schedule."""
from __future__ import annotations

from dspark.core.errors import DSparkError
from dspark.models.heads import RELEASED, build_head, read_head

from .data import draft_vocabulary

# Fields a warm start may change: calibration output (refitted by `dspark calibrate`) and where the target came from.
WARM_START_FREE = frozenset({"confidence_temperatures", "target_name_or_path", "target_revision"})


def warm_start(folder, draft_cfg, target, fallback: bool = False):
    """A head of `draft_cfg` for `target` holding the weights and draft vocabulary of the trained head in
    `folder` (`init_from=`): a new LR schedule continues it, on the same or other data. Its architecture
    must be the one `draft_cfg` builds; one clear error names the fields that differ (or, with
    `fallback`, None: train from scratch)."""
    old = read_head(folder)
    head = build_head(draft_cfg, target, old.d2t)
    mine, theirs = vars(head.config), vars(old.config)
    differ = sorted(k for k in mine if k not in WARM_START_FREE and mine[k] != theirs.get(k))
    if fallback and (type(head) is not type(old) or differ):
        return None
    if type(head) is not type(old):
        raise DSparkError(f"init_from={folder} holds a {old.architecture} head but draft.architecture builds "
                          f"{head.architecture}: pass draft.architecture={old.architecture}")
    if differ:
        shown = ", ".join(f"{k}: head {theirs.get(k)!r} vs draft {mine[k]!r}" for k in differ)
        raise DSparkError(f"init_from={folder} does not fit this run's draft settings ({shown}): pass the head's "
                          "draft settings (draft=<its size> and overrides) or train from scratch without init_from")
    head.load_state_dict(old.state_dict(), strict=True)   # weights and d2t; the target's shared rows stay attached
    return head


def initial_head(cfg, target, train_rows, say=print):
    """(head, the folder it was warm-started from or None). `init_from=released` takes the committed head
    for this target (heads/<target>) when there is one and it fits `draft=`, and otherwise trains from
    scratch, saying why."""
    if cfg.init_from == "released":
        folder = RELEASED / target.name
        if not (folder / "config.json").is_file():
            say(f"init_from=released: no released head for target {target.name}: training from scratch")
        else:
            head = warm_start(folder, cfg.draft, target, fallback=True)
            if head is not None:
                return head, f"heads/{target.name}"
            say(f"init_from=released: heads/{target.name} does not fit draft=: training from scratch")
    elif cfg.init_from:
        return warm_start(cfg.init_from, cfg.draft, target), cfg.init_from
    d2t = draft_vocabulary(train_rows, cfg.draft.draft_vocab_size, target.vocab_size)
    return build_head(cfg.draft, target, d2t), None
