"""Inference precision: bf16 weights where the hardware has bf16 units, int8 weight-only linears,
and the one loader that applies them for generate, chat, serve and eval.

    native_bf16("cpu")                 does this device multiply bf16 natively (and why)
    quantize(model, "int8")            every linear layer -> Int8Linear, in place (inference only)
    load_for_inference(path, dtype="bf16", quantize_method="int8", compile=True)
                                       load_model + the above (+ a compiled decode step)

int8 weight-only: each output channel's weights are scaled so their largest magnitude is 127
(symmetric, per channel) and rounded; activations stay in floating point. The product runs in
PyTorch's own int8 x bf16 kernel (torch._weight_int8pack_mm: AVX-512/AMX on x86 CPUs, also
CUDA and MPS), which on this project's CPU decodes 2.6x faster than fp32 and 14x faster than
torchao 0.18's Int8WeightOnlyConfig (which falls back to dequantizing on CPU); see README.
Where that kernel is missing, the weights are dequantized per call (same numbers, no speed).
Embeddings and norms keep the model's dtype. A quantized model is for decoding and scoring
only: it cannot be trained or saved.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LMFoundryError

QUANTIZATIONS = ("int8",)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def autocast_dtype(dtype: str, native: bool) -> torch.dtype | None:
    """The dtype training forwards run under autocast for a --dtype setting (None: fp32); `auto`
    is bf16 where the device multiplies bf16 natively (`native`, see native_bf16). The one rule
    the training loop, the LoRA base placement and the memory planner follow."""
    from .checkpoint.io import parse_dtype
    if dtype == "auto":
        return torch.bfloat16 if native else None
    wanted = parse_dtype(dtype)
    return None if wanted == torch.float32 else wanted


def native_bf16(device="cpu") -> tuple[bool, str]:
    """(whether `device` has native bf16 matrix support, the reason in words).

    CUDA: torch.cuda.is_bf16_supported(). CPU: the avx512_bf16 or amx_bf16 flags (x86) or bf16
    (Arm); LMFOUNDRY_CPU_BF16=0/1 overrides the detection (the test suite pins 0, so its numbers
    do not depend on the machine)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA bf16" if ok else "this GPU has no bf16"
    if device.type != "cpu":
        return False, f"{device.type}: not detected"
    forced = os.environ.get("LMFOUNDRY_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"LMFOUNDRY_CPU_BF16={forced}"
    found = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    return (True, f"CPU has {', '.join(found)}") if found else (False, "CPU has no bf16 units")


# ---------------------------------------------------------------- int8 weight-only

def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q int8 [N, K], scales fp32 [N]) with weight ~ q * scales[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x @ (q * scales[:, None]).T with int8 weights q [N, K] and fp32 per-channel scales [N]
    (buffers: no gradients). Activations are multiplied in bf16 on CPU (the kernel's fast path;
    fp32 inputs are rounded to bf16 and the result returned in fp32), else in their own dtype."""

    def __init__(self, linear: nn.Linear | torch.Tensor):
        super().__init__()
        weight = linear.weight if isinstance(linear, nn.Linear) else linear
        q, scales = int8_weights(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        dtype = torch.bfloat16 if x.device.type == "cpu" and x.dtype == torch.float32 else x.dtype
        flat = x.reshape(-1, self.in_features).to(dtype)
        try:
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales.to(dtype))
        except (RuntimeError, NotImplementedError):      # no int8 kernel for this device/dtype
            y = F.linear(flat, self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None])
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize(model, method: str = "int8"):
    """Replace every nn.Linear of `model` (attention, MLP, the output layer; a tied output layer
    gets its own int8 copy of the embeddings) by an Int8Linear, in place; returns the model, in
    eval mode. Applied from outside: the Transformer itself does not change."""
    if method not in QUANTIZATIONS:
        raise LMFoundryError(f"--quantize {method}: unknown; known: {', '.join(QUANTIZATIONS)}")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child).to(child.weight.device))
    if getattr(model, "lm_head", False) is None:          # tied embeddings: the head reads embed.weight
        model.lm_head = Int8Linear(model.embed.weight).to(model.embed.weight.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------- the one loader

def load_for_inference(path, dtype: str | None = "auto", quantize_method: str | None = None, device=None,
                       compile: bool = False, adapter=None):
    """The model generate, chat, serve and eval run: load_model in `dtype` (auto: the checkpoint's),
    then, with quantize_method "int8", int8 weight-only linears (and, unless a dtype was given,
    bf16 for the rest: the int8 kernel multiplies in bf16); with `compile`, one compiled decode
    step over a static KV cache (generate.compile_decoding); `adapter`: a PEFT LoRA adapter folded
    into the weights as they are read."""
    from .checkpoint import load_model
    from .checkpoint.io import parse_dtype
    dtype = parse_dtype(dtype)
    if quantize_method is not None and quantize_method not in QUANTIZATIONS:
        raise LMFoundryError(f"--quantize {quantize_method}: unknown; known: {', '.join(QUANTIZATIONS)}")
    if quantize_method is not None and dtype is None:
        dtype = torch.bfloat16
    model = load_model(path, dtype=dtype, device=device, adapter=adapter)
    if quantize_method:
        quantize(model, quantize_method)
    if compile:
        from .generate import compile_decoding
        compile_decoding(model)
    return model
