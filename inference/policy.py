"""Verification policies: how many of each request's drafted tokens the target verifies this step.

A policy sees every active request's proposal (tokens, draft distributions, confidences) and the
per-request limits, and returns a prefix length per request. Because it returns *prefix lengths*,
a policy can never verify a position whose predecessor it cut. The confidence scheduler
(hardware-aware prefix scheduling) plugs in here with the same `choose` signature.
"""
from __future__ import annotations


class VerifyAll:
    """Verify every drafted token (up to the per-request limit)."""

    name = "all"

    def choose(self, states, proposals, limits) -> list[int]:
        return [min(len(p.tokens), lim) for p, lim in zip(proposals, limits)]
