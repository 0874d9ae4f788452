"""How much memory a training run needs per device, from what lmfoundry allocates.

    plan = plan_training(ModelConfig.from_preset("solar-10.7b"), "qlora", seq_len=4096, batch_size=1,
                         lora=LoraConfig(rank=16), device="cuda", gpu_memory="80GB")
    print(plan.describe())
    lmfoundry plan --model solar-10.7b --method qlora --seq-len 4096 --batch-size 1 --gpu-memory 80GB

It is a model of this code, not a rule of thumb: every figure below follows what the training loop,
model.py, lora.py and torch keep alive, and tests/test_plan.py checks the activations against the
tensors autograd saves and the total against the measured peak RSS of real CPU runs.

    weights      full: fp32 master weights. LoRA: the frozen base in the compute dtype (bf16 on GPU,
                 fp32 on CPU) + fp32 adapters. QLoRA: the seven projections in NF4 (torchao: 4-bit
                 codes, an int8 absmax per 64 values, a scale per 256 absmaxes), the rest as LoRA
    gradients    fp32, trainable parameters only (DDP keeps a second copy in its buckets)
    optimizer    AdamW: two fp32 moments per trainable parameter
    activations  what autograd saves per token and layer for this model code: the residual stream,
                 norm outputs (one bf16 copy per linear that reads them under autocast), q k v and
                 the attention output (flash/memory-efficient SDPA: no T x T matrix), the SwiGLU
                 intermediates, adapter inputs; with activation checkpointing only each block's
                 input plus one block recomputed
    logits       the fp32 log-softmax autograd keeps, the logits and their float copy
    transient    the largest short-lived buffer: a dequantized NF4 weight (torchao's dequantization
                 works through int64 codes), AdamW's update temporaries (one moment-sized buffer on
                 GPU, where it runs foreach), FSDP's gathered blocks

peak = weights + optimizer + max(activations + max(logits, transient), gradients + optimizer step)
(with gradient accumulation the gradients stay allocated through later micro-batches). Not
covered: the Python and torch baseline (about 0.3-0.5 GB RSS on CPU), the CUDA context and
allocator fragmentation on GPU (planned as `reserve`), data loading, and attention that falls back
to the math kernel (an explicit mask on devices without a masked fused kernel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .checkpoint.io import parse_size
from .config import ModelConfig
from .errors import ConfigError

METHODS = ("full", "lora", "qlora")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
CUDA_RESERVE = 1 << 30          # CUDA context + caching-allocator slack, planned on GPU


@dataclass
class MemoryPlan:
    """Bytes per device by component, the peak, and whether it fits `budget` (None: not checked)."""
    method: str
    rows: dict = field(default_factory=dict)
    total: int = 0
    budget: int | None = None
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def describe(self) -> str:
        lines = [f"memory plan per device ({self.method}):"]
        lines += [f"  {name:<34} {gib(b):>10}" for name, b in self.rows.items()]
        lines.append(f"  {'peak (planned)':<34} {gib(self.total):>10}")
        if self.budget is not None:
            lines.append(f"  {'budget':<34} {gib(self.budget):>10}  -> "
                         + ("fits" if self.fits else f"does NOT fit (short by {gib(self.total - self.budget)})"))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _proj_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, int]]:
    d, hd = cfg.dim, cfg.head_dim
    h, kv, f = cfg.n_heads[i], cfg.n_kv_heads[i], cfg.ffn_dim[i]
    return {"q": (h * hd, d), "k": (kv * hd, d), "v": (kv * hd, d), "o": (d, h * hd),
            "gate": (f, d), "up": (f, d), "down": (d, f)}


def nf4_bytes(numel: int, scale_bytes: int) -> int:
    """torchao NF4Tensor storage: packed 4-bit codes, an int8 absmax per block of 64, one scale
    per 256 absmaxes (in the weight's dtype), the mean, and the 16-entry table."""
    blocks = numel // 64
    return numel // 2 + blocks + math.ceil(blocks / 256) * scale_bytes + 17 * scale_bytes


def adapter_params(cfg: ModelConfig, lora) -> int:
    """Trainable adapter parameters (a fused module's parts share A: counted once per module as
    PEFT's, but lmfoundry keeps one A per fused group too, so the count is per group)."""
    from .checkpoint.formats import default_format
    from .lora import targeted
    total = 0
    for g in targeted(cfg, default_format(cfg), lora.targets):
        total += lora.rank * (g.in_features + sum(g.sizes))
        if lora.dora and not g.embedding:
            total += sum(g.sizes)
    return total


def _activations(cfg: ModelConfig, method: str, lora, c: int, autocast: bool, gpu: bool = True
                 ) -> tuple[float, float, float]:
    """Bytes autograd saves per token: (all layers, the largest layer, embeddings + final norm) for
    this code. c: the compute dtype's bytes; autocast: linears cast an fp32 input to bf16, one copy
    per linear (so q, k and v each save their own copy of the norm's output)."""
    full = method == "full"
    targets = set(PROJECTIONS) | {"embed", "lm_head"} if full else set(lora.targets)
    copies = autocast and (full or not autocast)                  # an fp32 residual stream read by bf16 linears
    drop = not full and lora.dropout > 0
    dora = not full and lora.dora

    def norm_saves(readers: list[str], width: int, grad_in: bool = True) -> float:
        """RMSNorm (in fp32: its fp32 input and rsqrt; the normalised input when its weight trains)
        and the output, saved by the linears that read it when they train or carry an adapter."""
        out = (4 * width + 4 if grad_in else 0) + (4 * width if full else 0)
        readers = [t for t in readers if t in targets and not drop]   # with dropout only its output is saved
        if readers:
            out += width * c * (len(readers) if copies else 1)
        return out

    def adapter_saves(name: str, fan_in: int, fan_out: int, grad_in: bool) -> float:
        if full or name not in targets:
            return 0
        out = lora.rank * c                                           # A(x), read by B
        if drop:                                                      # the dropped input, and its mask (bool on
            out += fan_in * (c + ((1 if gpu else c) if grad_in else 0))   # CUDA, the input's dtype on CPU)
        if dora:
            out += fan_out * c * 2 + (fan_out * c if drop else 0)     # base output, LoRA output (+ base on x')
        return out

    per_layer, grad = [], full or "embed" in targets      # does the residual stream need a gradient yet?
    for i in range(cfg.n_layers):
        shapes = _proj_shapes(cfg, i)
        qd, kvd, f, d = shapes["q"][0], shapes["k"][0], shapes["gate"][0], cfg.dim
        layer_in = grad
        b = norm_saves(["q", "k", "v"], d, grad)
        attn = grad or bool(targets & {"q", "k", "v"})    # q, k, v need gradients: SDPA saves its inputs
        if attn:
            b += (qd + 2 * kvd) * c + qd * c + 4 * cfg.n_heads[i]     # q k v, output (= o's input), lse
            if cfg.qk_norm:                                           # q/k RMSNorm in fp32
                b += (qd + kvd) * (4 + (c if full else 0)) + 4 * (cfg.n_heads[i] + cfg.n_kv_heads[i])
        elif "o" in targets and not drop:
            b += qd * c                                               # the attention output, for o's adapter
        grad = attn or "o" in targets
        b += norm_saves(["gate", "up"], d, grad)
        if grad or targets & {"gate", "up"}:
            b += 3 * f * c                                            # gate, silu and up outputs
            grad = True
        b += f * c if "down" in targets and not drop else 0           # their product, for down
        b += sum(adapter_saves(t, s[1], s[0], layer_in or t not in ("q", "k", "v")) for t, s in shapes.items())
        grad = grad or "down" in targets
        per_layer.append(b)
    ends = norm_saves(["lm_head"], cfg.dim, grad) + adapter_saves("lm_head", cfg.dim, cfg.vocab_size, True)
    if "embed" in targets:
        ends += 8 + (0 if full else lora.rank * c)                    # token ids (and A^T[x])
    return sum(per_layer), max(per_layer), ends


def autocast_copies(cfg: ModelConfig, method: str, adapters: int) -> int:
    """bf16 copies of fp32 weights that autocast makes in the forward and autograd keeps until the
    backward: every linear's weight for full fine-tuning, the adapters' otherwise."""
    if method != "full":
        return 2 * adapters
    linear = sum(math.prod(s) for n, s in cfg.shapes().items() if not n.endswith("norm.weight") and n != "embed.weight")
    return 2 * (linear + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0))


def plan_training(cfg: ModelConfig, method: str = "full", seq_len: int = 2048, batch_size: int = 1, *, lora=None,
                  gpus: int = 1, fsdp: bool = False, activation_checkpointing: bool = False, device: str = "cuda",
                  dtype: str = "auto", grad_accum: int = 1, rows_per_example: int = 1,
                  gpu_memory=None) -> MemoryPlan:
    """The memory one device needs to train `cfg` with `method` on batch_size x seq_len tokens per
    micro-batch (rows_per_example 2 for DPO, which runs chosen and rejected in one forward)."""
    from .lora import LoraConfig
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method != "full":
        lora = lora or LoraConfig(qlora=method == "qlora")
        if lora.qlora != (method == "qlora"):
            lora = LoraConfig(**{**lora.__dict__, "qlora": method == "qlora"})
    gpu = device != "cpu"
    autocast = dtype in ("bfloat16", "bf16") or (dtype == "auto" and gpu)
    c = 2 if autocast else 4
    shards = gpus if fsdp else 1
    tokens = batch_size * seq_len * rows_per_example
    n_proj = sum(math.prod(s) for i in range(cfg.n_layers) for s in _proj_shapes(cfg, i).values())
    total_params = cfg.num_params()
    trainable = total_params if method == "full" else adapter_params(cfg, lora)
    if method == "full":
        weights = 4 * total_params
    elif method == "lora":
        weights = c * total_params + 4 * trainable
    else:
        quant = sum(nf4_bytes(math.prod(s), c) for i in range(cfg.n_layers) for s in _proj_shapes(cfg, i).values())
        weights = quant + c * (total_params - n_proj) + 4 * trainable
    plan = MemoryPlan(method)
    rows = plan.rows
    rows["weights"] = weights / shards
    rows["gradients"] = 4 * trainable / shards * (2 if gpus > 1 and not fsdp else 1)
    rows["optimizer states (AdamW)"] = 8 * trainable / shards
    acts, one_layer, final = _activations(cfg, method, lora, c, autocast, gpu)
    r = 4 if (method == "full" or not autocast) else c
    ckpt_acts = (cfg.n_layers * r * cfg.dim + one_layer + final) * tokens
    rows["activations, no checkpointing"] = (acts + final) * tokens
    rows["activations, with checkpointing"] = ckpt_acts
    activations = ckpt_acts if activation_checkpointing else rows["activations, no checkpointing"]
    rows["logits (fp32 log-softmax + logits)"] = tokens * cfg.vocab_size * (8 if c == 4 else 10)
    transient, what = _transient(cfg, method, lora, c, gpu, trainable, shards, fsdp)
    rows[f"transient ({what})"] = transient
    if gpu:
        rows["reserve (CUDA context, allocator)"] = CUDA_RESERVE
    step = rows["gradients"] + (4 * trainable / shards if gpu else 2 * 4 * _largest_trainable(cfg, method, lora))
    during = activations + max(rows["logits (fp32 log-softmax + logits)"], transient)
    if grad_accum > 1:
        during += rows["gradients"]
    plan.total = int(rows["weights"] + rows["optimizer states (AdamW)"] + max(during, step)
                     + rows.get("reserve (CUDA context, allocator)", 0))
    plan.budget = parse_size(gpu_memory) if gpu_memory else None
    if fsdp and gpus == 1:
        plan.notes.append("--fsdp with one GPU shards nothing")
    if method == "qlora" and not gpu:
        plan.notes.append("QLoRA on CPU dequantizes every projection twice per step (slow)")
    return plan


def _largest_trainable(cfg: ModelConfig, method: str, lora) -> int:
    if method == "full":
        return max(math.prod(s) for s in cfg.shapes().values())
    return max(lora.rank * max(cfg.vocab_size if "embed" in lora.targets else 0, cfg.dim, max(cfg.ffn_dim)), 1)


def _transient(cfg, method, lora, c, gpu, trainable, shards, fsdp) -> tuple[float, str]:
    biggest = max(math.prod(s) for i in range(cfg.n_layers) for s in _proj_shapes(cfg, i).values())
    options = {"none": 0.0}
    if method == "qlora":
        # torchao get_original_weight: two int64 code halves, the table lookups, the scaled halves, the stack
        options["NF4 dequantization"] = biggest * (8 + 3 * c)
    if method != "full" and lora.dora:
        options["DoRA weight norm"] = biggest * 4 * 3
    if fsdp and shards > 1:
        block = max(sum(math.prod(s) for s in _proj_shapes(cfg, i).values()) for i in range(cfg.n_layers))
        options["FSDP gathered blocks"] = 2 * block * (c if method == "full" else 1)
    what = max(options, key=options.get)
    return options[what], what
