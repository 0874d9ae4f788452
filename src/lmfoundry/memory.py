"""How much memory a training run needs per device, from what lmfoundry allocates.

    plan = plan_training(ModelConfig.from_preset("solar-10.7b"), "qlora", seq_len=4096, batch_size=1,
                         lora=LoraConfig(rank=16), device="cuda", gpu_memory="80GB")
    print(plan.describe())
    lmfoundry plan --model solar-10.7b --method qlora --seq-len 4096 --batch-size 1 --gpu-memory 80GB

It is a model of this code, not a rule of thumb: every figure below follows what the training loop,
model.py, lora.py and torch keep alive, and tests/test_plan.py checks the activations against the
tensors autograd saves and the total against the measured peak RSS of real CPU runs.

    weights      full: fp32 master weights. LoRA: the frozen base in the compute dtype (bf16 under
                 autocast: on GPU, and on CPUs with native bf16 with --dtype auto) + fp32 adapters.
                 QLoRA: the seven projections in NF4 (torchao: 4-bit codes, an int8 absmax per 64
                 values, a scale per 256 absmaxes), the rest as LoRA
    gradients    fp32, trainable parameters only (DDP keeps a second copy in its buckets)
    optimizer    AdamW: two fp32 moments per trainable parameter; fused (CPU/CUDA without FSDP) it
                 updates in place, FSDP2's foreach AdamW takes one moment-sized buffer
    activations  what autograd saves per token and layer for this model code: the residual stream,
                 norm outputs (one bf16 copy per linear that reads them under autocast), q k v and
                 the attention output (flash/memory-efficient SDPA: no T x T matrix), the SwiGLU
                 intermediates, adapter inputs, bf16 copies of the decoder's weights under autocast;
                 then the chunked loss head (train/objectives.py label_logps, run inside the
                 model's forward): the final norm, a bool mask of the labelled tokens and, per
                 labelled token, grad_h (summed loss: next-token, SFT) or the hidden row, label and
                 logsumexp (per-token log-probs: DPO, GRPO). With activation checkpointing only each
                 block's input plus one block recomputed
    logits       one chunk of at most LOGITS_PER_CHUNK fp32 logits (and the product in bf16 under
                 autocast), the output weight cast to bf16, and the output weight's fp32 gradient:
                 the summed loss makes it in the forward and keeps it to the backward (which scales
                 it into a second one), the per-token loss builds it in the backward. An lm_head
                 adapter hands the loss its merged weight W + s·B@A (lora.py merged_weight): a V x D
                 tensor in the base's dtype that the per-token loss saves, a gradient the summed
                 loss now makes, and with DoRA the unscaled sum its rescaling saves
    transient    the largest short-lived buffer: a dequantized NF4 weight (torchao's dequantization
                 works through int64 codes), DoRA's weight norm, FSDP's gathered blocks
    checkpoint   the streamed writer (checkpoint/dcp_writer.py) writes each rank's state file
                 tensor by tensor from where the tensors live: nothing on CPU, the largest tensor
                 of the file in host memory from a GPU (a note); torch's own writer, used where
                 torch lacks the names it needs, holds the file twice (24 bytes per parameter
                 for full fine-tuning)

peak = weights + optimizer + max(activations + max(logits, transient), gradients + optimizer step,
checkpoint) (with gradient accumulation the gradients stay allocated through later micro-batches).
Not covered: the Python and torch baseline (about 0.3-0.5 GB RSS on CPU), the CUDA context and
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
    steps_peak: int = 0            # the peak while training steps run (total also covers checkpoint writes)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def describe(self) -> str:
        lines = [f"memory plan per device ({self.method}):"]
        lines += [f"  {name:<34} {gib(b):>10}" for name, b in self.rows.items()]
        if self.steps_peak and self.steps_peak != self.total:
            lines.append(f"  {'peak during steps':<34} {gib(self.steps_peak):>10}")
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


def _activations(cfg: ModelConfig, method: str, lora, c: int, autocast: bool, gpu: bool = True,
                 summed: bool = True) -> tuple[float, float, float]:
    """Bytes autograd saves per token: (all layers, the largest layer, embeddings + final norm + the
    loss head) for this code. c: the compute dtype's bytes; autocast: linears cast an fp32 input to
    bf16, one copy per linear (so q, k and v each save their own copy of the norm's output);
    summed: the summed loss (next-token, SFT) rather than per-token log-probs (DPO, GRPO)."""
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
    # the final norm's output goes to label_logps (train/objectives.py), not through a linear: the
    # labelled rows are picked by a bool mask (saved, a byte per token); the summed loss saves
    # grad_h [N, D] (only when the hidden states need a gradient), the per-token one its input rows,
    # labels (int64) and logsumexp (fp32) (also when only an lm_head adapter needs a gradient).
    needs = grad or full or (not summed and "lm_head" in targets)
    r = 4 if full or c == 4 else c                                    # the residual stream's bytes
    ends = norm_saves([], cfg.dim, grad)
    ends += 1 + cfg.dim * r + (0 if summed else 12) if needs else 0
    if "embed" in targets:
        ends += 8 + (0 if full else lora.rank * c)                    # token ids (and A^T[x])
    return sum(per_layer), max(per_layer), ends


def autocast_copies(cfg: ModelConfig, method: str, adapters: int) -> int:
    """bf16 copies of fp32 weights that autocast makes in the forward and autograd keeps until the
    backward: every decoder linear's weight for full fine-tuning (label_logps casts the output
    weight itself, outside autocast, and does not keep the copy), the adapters' otherwise
    (`adapters`: adapter_params; an lm_head adapter's B @ A runs under autocast too)."""
    if method != "full":
        return 2 * adapters
    return 2 * sum(math.prod(s) for n, s in cfg.shapes().items()
                   if not n.endswith("norm.weight") and n not in ("embed.weight", "lm_head.weight"))


def loss_head(cfg: ModelConfig, method: str, c: int, tokens: int, summed: bool, hidden_grad: bool,
              lora=None) -> tuple[float, float]:
    """(bytes the loss head saves for backward beyond the per-token activations, bytes it holds at
    its worst moment including those) for `tokens` labelled tokens, following train/objectives.py:
    LOGITS_PER_CHUNK logits at a time (fp32, plus the product in the compute dtype), the output
    weight cast once to it, and the output weight's fp32 gradient (with a buffer of its shape in
    the compute dtype). summed: grad_h and grad_w are made in the forward and kept to the backward,
    which scales them into new tensors; per-token: the backward recomputes each chunk and always
    builds grad_w, even for a frozen weight. An lm_head adapter (lora.py merged_weight) makes the
    output weight a V x D tensor in the base's dtype (c): saved by the per-token loss, alive through
    the summed one's forward, whose grad_w it now needs; DoRA's rescaling also saves W + s·B@A."""
    from .train.objectives import LOGITS_PER_CHUNK
    V, D = cfg.vocab_size, cfg.dim
    low = c < 4                                                       # products in bf16
    w = 4 if method == "full" else c                                  # the output weight's bytes
    adapter = method != "full" and lora is not None and "lm_head" in lora.targets
    merged = V * D * c if adapter else 0
    dora = V * D * c + 2 * V * c if adapter and lora.dora else 0     # W + s·B@A, the norm and the ratio
    rows = min(tokens, max(1, LOGITS_PER_CHUNK // V))
    chunk = rows * V * (4 + 2 * low) + rows * D * 2 * low
    cast = 2 * V * D if low and w == 4 else 0
    grad_h = tokens * D * (4 if method == "full" or not low else c) if hidden_grad else 0
    to_weight = V * D * w if w != 4 else 0                            # grad_w cast to the weight's dtype
    if summed:
        trains = method == "full" or adapter
        saved = (4 * V * D if trains else 0) + dora
        forward = saved + merged + (2 * V * D * low if trains else 0) + cast + chunk
        backward = dora + (8 * V * D + to_weight if trains else 0) + grad_h
        return saved, max(forward, backward)
    saved = merged + dora
    backward = saved + cast + chunk + grad_h + 4 * V * D + 2 * V * D * low + to_weight
    return saved, max(saved + cast + chunk, backward)


def checkpoint_write(cfg: ModelConfig, method: str, lora=None, gpu: bool = False, shards: int = 1) -> float:
    """Host bytes a checkpoint write adds (on CPU: the device's). The streamed writer
    (checkpoint/dcp_writer.py) writes a rank's state file header first and then each tensor from
    its own memory: on CPU nothing is copied; from a GPU one tensor at a time comes to the host, the
    largest fp32 tensor of the file (the AdamW moments, and the weights for full fine-tuning;
    adapters go to their own file). Where torch lacks the names it needs, torch's writer builds the
    whole file in memory twice (safetensors.torch.save): 24 bytes per parameter for full fine-tuning."""
    from .checkpoint.dcp_writer import STREAMING
    trainable = cfg.num_params() if method == "full" else adapter_params(cfg, lora)
    if not STREAMING:
        return 2 * (8 * trainable + (4 * cfg.num_params() if method == "full" else 0)) / shards
    if not gpu:
        return 0
    if method == "full":
        return 4 * max(math.prod(s) for s in cfg.shapes().values()) / shards
    from .checkpoint.formats import default_format
    from .lora import targeted
    return 4 * lora.rank * max(max(g.in_features, *g.sizes) for g in targeted(cfg, default_format(cfg), lora.targets))


def plan_training(cfg: ModelConfig, method: str = "full", seq_len: int = 2048, batch_size: int = 1, *, lora=None,
                  gpus: int = 1, fsdp: bool = False, activation_checkpointing: bool = False, device: str = "cuda",
                  dtype: str = "auto", grad_accum: int = 1, rows_per_example: int = 1, summed_loss: bool = True,
                  gpu_memory=None) -> MemoryPlan:
    """The memory one device needs to train `cfg` with `method` on batch_size x seq_len tokens per
    micro-batch (rows_per_example 2 for DPO, which runs chosen and rejected in one forward).
    summed_loss: the objective sums label log-probs in the loss head (next-token, SFT); False for
    per-token log-probs (DPO, GRPO). dtype auto follows the loop: bf16 autocast on GPUs and on CPUs
    with native bf16 (lmfoundry.quantize.native_bf16), else fp32."""
    from .lora import LoraConfig
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method != "full":
        lora = lora or LoraConfig(qlora=method == "qlora")
        if lora.qlora != (method == "qlora"):
            lora = LoraConfig(**{**lora.__dict__, "qlora": method == "qlora"})
    gpu = device != "cpu"
    autocast = autocast_on(device, dtype)
    c = 2 if autocast else 4
    shards = gpus if fsdp else 1
    tokens = batch_size * seq_len * rows_per_example
    total_params = cfg.num_params()
    trainable = total_params if method == "full" else adapter_params(cfg, lora)
    plan = MemoryPlan(method)
    rows = plan.rows
    rows["weights"] = _weights(cfg, method, c, trainable) / shards
    rows["gradients"] = 4 * trainable / shards * (2 if gpus > 1 and not fsdp else 1)
    rows["optimizer states (AdamW)"] = 8 * trainable / shards
    acts, one_layer, final = _activations(cfg, method, lora, c, autocast, gpu, summed_loss)
    r = 4 if (method == "full" or not autocast) else c
    rows["activations, no checkpointing"] = (acts + final) * tokens
    rows["activations, with checkpointing"] = (cfg.n_layers * r * cfg.dim + one_layer + final) * tokens
    activations = rows[f"activations, {'with' if activation_checkpointing else 'no'} checkpointing"]
    head_grad = method == "full" or bool(set(lora.targets) - {"lm_head"})
    rows["logits chunk + output-layer grads"] = loss_head(cfg, method, c, tokens, summed_loss, head_grad, lora)[1]
    transient, what = _transient(cfg, method, lora, c, gpu, trainable, shards, fsdp)
    rows[f"transient ({what})"] = transient
    # fused AdamW (CPU/CUDA without FSDP) updates in place; FSDP2's foreach AdamW takes a moment-sized buffer
    step = rows["gradients"] + (4 * trainable / shards if fsdp else 0)
    during = activations + max(rows["logits chunk + output-layer grads"], transient)
    if grad_accum > 1:
        during += rows["gradients"]
    saving = checkpoint_write(cfg, method, lora, gpu, shards)
    if gpu:
        rows["reserve (CUDA context, allocator)"] = CUDA_RESERVE
    else:
        rows["checkpoint write"] = saving
    held = rows["weights"] + rows["optimizer states (AdamW)"] + rows.get("reserve (CUDA context, allocator)", 0)
    plan.steps_peak = int(held + max(during, step))
    plan.total = int(held + max(during, step, 0 if gpu else saving))
    plan.budget = parse_size(gpu_memory) if gpu_memory else None
    if fsdp and gpus == 1:
        plan.notes.append("--fsdp with one GPU shards nothing")
    if method == "qlora" and not gpu:
        plan.notes.append("QLoRA on CPU dequantizes every projection twice per step (slow)")
    if gpu:
        plan.notes.append(f"checkpoints also need {gib(saving)} of host memory per process while they are written")
    return plan


def autocast_on(device: str, dtype: str) -> bool:
    """Whether the training loop runs forwards under bf16 autocast (quantize.autocast_dtype, the
    loop's rule; a GPU being planned for is taken to have bf16 units)."""
    from .quantize import autocast_dtype, native_bf16
    native = device != "cpu" or (dtype == "auto" and native_bf16("cpu")[0])
    return autocast_dtype(dtype, native) is not None


def _weights(cfg: ModelConfig, method: str, c: int, trainable: int) -> float:
    """full: fp32 master weights; LoRA: the base in the compute dtype + fp32 adapters; QLoRA: the
    projections in NF4, the rest as LoRA."""
    total = cfg.num_params()
    if method == "full":
        return 4 * total
    if method == "lora":
        return c * total + 4 * trainable
    shapes = [s for i in range(cfg.n_layers) for s in _proj_shapes(cfg, i).values()]
    quant = sum(nf4_bytes(math.prod(s), c) for s in shapes)
    return quant + c * (total - sum(math.prod(s) for s in shapes)) + 4 * trainable


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
