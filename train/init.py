"""Where a training run's head starts: from scratch, from a trained head (`init_from=<folder>`), or from
the committed head for its target (`init_from=released`): a warm start continues a head's weights and
draft vocabulary under a new LR schedule."""
from __future__ import annotations

from dspark.core.errors import DSparkError
from dspark.models.heads import build_head, read_head, released_head

from .data import draft_vocabulary

# Fields a warm start may change: calibration output (refitted by `dspark calibrate`) and where the target came from.
WARM_START_FREE = frozenset({"confidence_temperatures", "target_name_or_path", "target_revision"})


def _misfit(old, head) -> str | None:
    """What keeps trained head `old` from seeding `head` (`architecture: head dspark vs draft eagle3`,
    `num_layers: head 1 vs draft 2`, …), or None when it fits."""
    if type(head) is not type(old):
        return f"architecture: head {old.architecture} vs draft {head.architecture}"
    mine, theirs = vars(head.config), vars(old.config)
    differ = sorted(k for k in mine if k not in WARM_START_FREE and mine[k] != theirs.get(k))
    return ", ".join(f"{k}: head {theirs.get(k)!r} vs draft {mine[k]!r}" for k in differ) or None


def _seeded(folder, draft_cfg, target):
    """(a head of `draft_cfg` for `target` holding the weights and draft vocabulary of the trained head in
    `folder`, None) — or (a fresh one, why the trained head does not fit) with nothing loaded."""
    old = read_head(folder)
    head = build_head(draft_cfg, target, old.d2t)
    problem = _misfit(old, head)
    if problem is None:
        head.load_state_dict(old.state_dict(), strict=True)   # weights and d2t; the target's shared rows stay attached
    return head, problem


def warm_start(folder, draft_cfg, target):
    """`init_from=<folder>`: the trained head's weights and draft vocabulary, continued under a new LR
    schedule on the same or other data; one clear error when it does not fit `draft_cfg`."""
    head, problem = _seeded(folder, draft_cfg, target)
    if problem:
        raise DSparkError(f"init_from={folder} does not fit this run's draft settings ({problem}): pass the head's "
                          "draft settings (draft=<its size> and overrides, draft.architecture=) or train from scratch "
                          "without init_from")
    return head


def initial_head(cfg, target, train_rows, say=print):
    """(head, the folder it was warm-started from or None). `init_from=released` takes the committed head
    for this target (heads/<target>) when there is one and it fits `draft=`, and otherwise trains from
    scratch, saying why."""
    if cfg.init_from == "released":
        folder = released_head(target.name)
        if folder is None:
            say(f"init_from=released: no released head for target {target.name}: training from scratch")
        else:
            head, problem = _seeded(folder, cfg.draft, target)
            if problem is None:
                return head, f"heads/{target.name}"
            say(f"init_from=released: heads/{target.name} does not fit draft= ({problem}): training from scratch")
    elif cfg.init_from:
        return warm_start(cfg.init_from, cfg.draft, target), cfg.init_from
    d2t = draft_vocabulary(train_rows, cfg.draft.draft_vocab_size, target.vocab_size)
    return build_head(cfg.draft, target, d2t), None
