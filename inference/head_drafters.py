"""Trained head → runtime drafter, by the head's class."""
from __future__ import annotations

from dspark.models.dspark import DSparkDraft
from dspark.models.eagle3 import Eagle3Draft

from .drafters import Drafter
from .dspark_drafter import DSparkDrafter
from .eagle3_drafter import Eagle3Drafter

DRAFTERS: dict[type, type[Drafter]] = {DSparkDraft: DSparkDrafter, Eagle3Draft: Eagle3Drafter}


def drafter_for(head, target, temperature: float = 0.0, seed: int = 0) -> Drafter:
    for cls, drafter in DRAFTERS.items():
        if isinstance(head, cls):
            return drafter(head, target, temperature=temperature, seed=seed)
    raise TypeError(f"no runtime drafter for {type(head).__name__}")
