"""Trained head → runtime drafter, by the head's architecture key (the key of models/heads.py HEADS)."""
from __future__ import annotations

from .drafters import Drafter
from .dspark_drafter import DSparkDrafter
from .eagle3_drafter import Eagle3Drafter

DRAFTERS: dict[str, type[Drafter]] = {"dspark": DSparkDrafter, "eagle3": Eagle3Drafter}


def drafter_for(head, target, temperature: float = 0.0, seed: int = 0, draft_weights: str = "native",
                draft_compile: bool = False) -> Drafter:
    if head.architecture not in DRAFTERS:
        raise TypeError(f"no runtime drafter for architecture '{head.architecture}' ({type(head).__name__})")
    return DRAFTERS[head.architecture](head, target, temperature=temperature, seed=seed, draft_weights=draft_weights,
                                           draft_compile=draft_compile)
