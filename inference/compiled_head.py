"""Compiled drafting (`draft_compile=true`): a head drafter runs its hot methods (each head class lists
them in `compiled_methods`) through `torch.compile`, which fuses a proposal's hundreds of small tensor
ops into a few kernels. Shapes are dynamic (the context grows every step, the number of requests
varies), so one graph serves a whole run after a short compile on the first proposals. Drafts may
differ from the eager head's in the last bits; verification keeps the output exact either way.

On CPU, torch.compile's backend (inductor) builds C++ kernels: it needs a C++ compiler.
"""
from __future__ import annotations

import os
import shutil

import torch

from dspark.core.errors import DSparkError


def has_cpp_compiler() -> bool:
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"))


def compile_head_(head) -> None:
    """Replace `head`'s `compiled_methods` by their compiled versions, in place (on a drafter's own copy)."""
    if next(head.parameters()).device.type == "cpu" and not has_cpp_compiler():
        raise DSparkError("draft_compile=true needs a C++ compiler on CPU (torch.compile builds C++ kernels): "
                          "install g++ (or set CXX), or use draft_compile=false")
    for name in head.compiled_methods:
        setattr(head, name, torch.compile(getattr(head, name), dynamic=True))
