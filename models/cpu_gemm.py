"""bf16 linear layers (and RMSNorm) on CPUs whose torch has no fast bf16 matrix multiply (`target.cpu_gemm`).

Where the CPU lacks AVX-512 (most AMD Zen 2/3 machines, older and mobile Intel ones), torch's bf16
`linear` has a fast path for one row only; for more rows it loops row by row over the whole weight
matrix, single-threaded. A verification of γ + 1 = 8 tokens then costs ≈ 4× a plain decode step and
speculative decoding cannot pay (docs/design.md, "bf16 on AVX2 CPUs"). `cpu_gemm.c` reads each weight
row once for up to 8 rows of input, in fp32 arithmetic rounded to bf16 like torch's. It is compiled
with the machine's C compiler on first use (about a second) into the dspark cache, and called through
ctypes on tensors' memory. Llama's RMSNorm runs there too (`KernelRMSNorm`): its eight small tensor
operations cost ≈ 5 ms of a ≈ 38 ms decode step of SmolLM2 on such a CPU, one kernel call a fraction; so
does a DSpark head's greedy Markov block (`markov_greedy`: γ rounds of small operations, one call). The
attention of a layer whose projections run it multiplies in fp32 on the
same bf16 values (`matmul`, models/attention.py): torch's bf16 `bmm` is as slow there.

`cpu_gemm: auto` uses it for a bf16 target on the CPU when torch's own bf16 path is slow there (no
oneDNN bf16 support) and the CPU has AVX2 + FMA and a C compiler is found; `torch` never; `avx2` always
(one clear error where it cannot run). The drafter's head follows its target (inference/drafters.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark.core.errors import DSparkError

SOURCE = Path(__file__).with_name("cpu_gemm.c")
MODES = ("auto", "torch", "avx2")
MAX_ROWS = 64   # more rows: fp32 GEMM on upcast copies (compute-bound, where the kernel has no edge)
_lib = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"it needs an x86-64 CPU (this one is {platform.machine()})"
    if not {"avx2", "fma"} <= _cpu_flags():
        return "it needs a CPU with AVX2 and FMA"
    if _compiler() is None:
        return "it needs a C compiler (cc, gcc or clang on PATH, or CC)"
    return None


def torch_bf16_is_fast() -> bool:
    """torch multiplies bf16 matrices through oneDNN here (AVX-512 or newer): nothing to gain."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def wanted(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model of `dtype` on `device` should run its linear layers through the kernel."""
    if mode not in MODES:
        raise DSparkError(f"target.cpu_gemm '{mode}' is unknown: choose from {MODES}")
    if mode == "torch":
        return False
    fits = device.type == "cpu" and dtype == torch.bfloat16
    if mode == "auto":
        return fits and unavailable_reason() is None and not torch_bf16_is_fast()
    if not fits:
        raise DSparkError(f"target.cpu_gemm=avx2 is for bf16 targets on the CPU (this one: {dtype} on "
                          f"{device.type}): use target.cpu_gemm=auto")
    reason = unavailable_reason()
    if reason:
        raise DSparkError(f"target.cpu_gemm=avx2 cannot run here: {reason}; use target.cpu_gemm=auto")
    return True


def _library():
    """The compiled kernel, built once per source and compiler into the dspark cache."""
    global _lib
    if _lib is not None:
        return _lib
    cc = _compiler()
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + cc.encode()).hexdigest()[:12]
    folder = Path(os.path.expanduser(os.environ.get("DSPARK_CACHE", "~/.cache/dspark"))) / "kernels"
    so = folder / f"cpu_gemm-{key}.so"
    if not so.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            why = done.stderr.strip()[-400:] if done.returncode else None
        except OSError as e:          # CC names no program
            why = str(e)
        if why is not None:
            os.unlink(tmp)
            raise DSparkError(f"compiling the bf16 CPU kernel failed ({' '.join(cmd)}): {why}; "
                              "use target.cpu_gemm=torch")
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    lib.dspark_bf16_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.dspark_bf16_linear.restype = None
    lib.dspark_bf16_rmsnorm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.dspark_bf16_rmsnorm.restype = None
    lib.dspark_markov_greedy.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.dspark_markov_greedy.restype = None
    _lib = lib
    return lib


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for bf16 CPU tensors through the kernel (torch's own when autograd needs it)."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or x.dtype != torch.bfloat16 \
            or weight.dtype != torch.bfloat16 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    k = weight.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    if x2.shape[0] > MAX_ROWS:   # compute-bound: the machine's fp32 GEMM, on the same values
        y = F.linear(x2.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
        return y.view(*x.shape[:-1], weight.shape[0])
    w = weight.contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.bfloat16)
    if x2.shape[0]:
        _library().dspark_bf16_linear(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], w.shape[0], k,
                                      torch.get_num_threads())
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, weight · (x · rsqrt(mean(x²) + eps)) rounded to x's dtype, through the kernel for bf16
    CPU tensors without autograd (torch's operations otherwise)."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or x.dtype != torch.bfloat16 \
            or weight.dtype != torch.bfloat16 or x.device.type != "cpu":
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    d = weight.shape[0]
    x2 = x.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _library().dspark_bf16_rmsnorm(x2.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x2.shape[0], d,
                                       float(eps))
    return y.view(x.shape)


def markov_greedy(base: torch.Tensor, emb: torch.Tensor, up: torch.Tensor, first: torch.Tensor) -> torch.Tensor | None:
    """Greedy tokens of a block through a Markov chunk head in one kernel call: base (R, G, V) logits, emb
    (V + 1, r) and up (V, r) the head's matrices, first (R,) the anchors' draft ids → (R, G) draft ids,
    token k = argmax(base[:, k] + up · emb[token k − 1]) with each sum rounded to bf16: the same sums as the
    head's own loop through the kernel, so the same tokens. None where it does not apply (not all bf16 CPU
    tensors): use the loop."""
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in (base, emb, up)):
        return None
    base, emb, up = base.contiguous(), emb.contiguous(), up.contiguous()
    first = first.to(torch.int64).contiguous()
    r, g, v = base.shape
    toks = torch.empty(r, g, dtype=torch.int64)
    _library().dspark_markov_greedy(base.data_ptr(), emb.data_ptr(), up.data_ptr(), first.data_ptr(), toks.data_ptr(),
                                    r, g, v, up.shape[1], torch.get_num_threads())
    return toks


def runs_kernel(module: nn.Module) -> bool:
    """Whether a layer's own projections run through the kernel (its attention then multiplies in fp32)."""
    return any(isinstance(c, KernelLinear) for c in module.children())


def matmul(a: torch.Tensor, b: torch.Tensor, fp32: bool) -> torch.Tensor:
    """torch.matmul, or with `fp32` on fp32 copies rounded back to a's dtype: for bf16 operands the same
    products and fp32 sums as torch's bf16 matmul, so the same result up to summation order, through
    the machine's fp32 GEMM (torch's bf16 `bmm` is as slow as its `linear` where the kernel is used)."""
    return torch.matmul(a.float(), b.float()).to(a.dtype) if fp32 else torch.matmul(a, b)


class KernelLinear(nn.Module):
    """An nn.Linear's weight (the same tensor: tied weights stay tied) multiplied through the kernel."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class KernelRMSNorm(nn.Module):
    """A Llama RMSNorm module's weight (the same tensor) and epsilon, normalising through the kernel."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight = base.weight
        self.eps = float(getattr(base, "variance_epsilon", getattr(base, "eps", None)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def is_llama_rmsnorm(module: nn.Module) -> bool:
    """Whether a module computes Llama's RMSNorm: transformers' own (or a model's copy of it: the same
    bytecode, constants and names) or one of ours that says so (`is_llama_rmsnorm = True`)."""
    if getattr(type(module), "is_llama_rmsnorm", False):
        return True
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == \
        (ref.co_code, ref.co_consts, ref.co_names) and isinstance(getattr(module, "weight", None), torch.Tensor)


def swap_modules_(model: nn.Module, make, select) -> list[tuple[nn.Module, nn.Module]]:
    """Replace, in place, every submodule of `model` that `select` accepts by `make(module)`; returns the
    (old, new) pairs."""
    pairs = []
    for name, m in list(model.named_modules()):
        if name and select(m):
            parent, _, attr = name.rpartition(".")
            new = make(m)
            setattr(model.get_submodule(parent), attr, new)
            pairs.append((m, new))
    return pairs


def swap_linears_(model: nn.Module, make, select=lambda m: True) -> list[tuple[nn.Linear, nn.Module]]:
    """`swap_modules_` for the plain nn.Linear layers that `select` accepts."""
    return swap_modules_(model, make, lambda m: type(m) is nn.Linear and select(m))


def install_(model: nn.Module, norms: bool = True) -> int:
    """Swap, in place, every nn.Linear of `model` for a KernelLinear and (with `norms`) every Llama RMSNorm
    for a KernelRMSNorm; returns how many modules were swapped. Builds the kernel now, so a failing
    compiler stops before any work."""
    _library()
    swapped = swap_modules_(model, KernelRMSNorm, is_llama_rmsnorm) if norms else []
    return len(swapped) + len(swap_linears_(model, KernelLinear))
