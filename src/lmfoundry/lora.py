"""LoRA, rsLoRA, DoRA and QLoRA adapters on the one Transformer, applied from outside (as
train.distributed.parallelize() applies FSDP), saved and read in PEFT's format.

    apply_lora(model, LoraConfig(rank=16, alpha=32))   adapters on the targeted linears, base frozen
    with disable_adapters(model): ...                  the base model (DPO's reference)
    save_adapter(model, "out/")                        adapter_config.json + adapter_model.safetensors
    load_adapter(model, "out/")                        an adapter written by us or by PEFT, into the model
    adapter_base("out/")                               the base directory its adapter_config.json names
    load_lora_model(cfg, loaders, LoraConfig(...))     base weights streamed straight into place (QLoRA: NF4)
    Adapter("out/", cfg, fmt).fold(name, w)            W + s B@A (DoRA: rescaled rows): `lora merge`,
                                                       merge recipes' base+adapter, --adapter

The math is PEFT's (huggingface/peft src/peft/tuners/lora/layer.py, dora.py):
    y = x W^T + s B(A(dropout(x))),   s = alpha / r   (rsLoRA, arXiv 2312.03732: alpha / sqrt(r))
    DoRA (arXiv 2402.09353): n = ||W + s B@A|| per output row, detached (the paper's section 4.3),
        y = x W^T + (m/n - 1) x' W^T + (m/n) s B(A(x')),   x' = dropout(x)
        (x' W^T is the base output itself while dropout is off)
    embeddings: y = E[x] + s (A^T[x] @ B^T)
    init: A kaiming-uniform(a=sqrt(5)), B = 0 (embeddings: A = 0, B ~ N(0, 1)); DoRA's m = ||W|| per row.

An adapter sits on a Hugging Face module of the checkpoint's format. Where a format stores several
canonical weights in one module (OpenELM's qkv_proj = q|k|v and proj_1 = gate|up), the parts share
one A and split B and m by rows, which is exactly a LoRA on the fused module.

QLoRA (arXiv 2305.14314): the decoder's seven projection weights become torchao NF4Tensors (4-bit
NormalFloat codes in blocks of 64 with an absmax each, the absmaxes double-quantized to int8) and
are dequantized per layer in the forward and the backward (torchao's linear_nf4). Embeddings, norms
and lm_head stay in the compute dtype, as bitsandbytes + transformers leave them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint.formats import FORMATS, Format, default_format, refusal, weight_plan
from .checkpoint.io import atomic_dir, copy_tokenizer_files, read_json, write_json
from .config import ModelConfig
from .errors import AdapterError, CheckpointError

# short target name -> the canonical module it names ("{i}": every layer)
TARGETS = {"q": "layers.{i}.attn.q", "k": "layers.{i}.attn.k", "v": "layers.{i}.attn.v",
           "o": "layers.{i}.attn.o", "gate": "layers.{i}.mlp.gate", "up": "layers.{i}.mlp.up",
           "down": "layers.{i}.mlp.down", "lm_head": "lm_head", "embed": "embed"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
QUANTIZED = DEFAULT_TARGETS            # QLoRA stores these in NF4, targeted or not
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's block sizes (paper section 3; torchao's defaults)
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."           # PeftModelForCausalLM.base_model (LoraModel) .model (the HF model)
# PEFT key suffix -> (our slot, embedding?)
# (PEFT also saves a targeted embedding or lm_head whole, as <module>.base_layer.weight: it replaces the base's)
SUFFIXES = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False), ".lora_magnitude_vector": ("m", False),
            ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True), ".base_layer.weight": ("W", False)}
# adapter_config.json keys whose non-default values change the math in ways we do not implement
# (modules_to_save: whole modules saved beside the adapter; only a reward model's score head is read, see Adapter)
UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "layer_replication": None,
               "lora_bias": False, "trainable_token_indices": None, "target_parameters": None,
               "use_qalora": False, "alora_invocation_tokens": None}


def short_name(module: str) -> str:
    """layers.3.attn.q -> q, embed -> embed."""
    return module.rsplit(".", 1)[-1]


@dataclass
class LoraConfig:
    """What apply_lora() adds. alpha None: 2 x rank. targets: names from TARGETS."""
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    dora: bool = False
    qlora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        self.alpha = float(2 * self.rank if self.alpha is None else self.alpha)
        if not self.alpha > 0:
            raise AdapterError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = tuple(dict.fromkeys(self.targets))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AdapterError(f"unknown LoRA target {unknown[0] if unknown else '(none given)'!r}; "
                               f"known: {', '.join(TARGETS)}")
        if self.dora and "embed" in self.targets:
            raise AdapterError("DoRA on the embeddings is not supported: drop embed from the LoRA targets")

    @property
    def scaling(self) -> float:
        return scaling(self.alpha, self.rank, self.rslora)


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# ---------------------------------------------------------------- where adapters sit

@dataclass(frozen=True)
class Group:
    """One Hugging Face module an adapter may sit on, and the canonical modules it holds."""
    hf: str                        # model.layers.0.self_attn.q_proj
    parts: tuple[str, ...]         # ("layers.0.attn.q",); several when the format fuses them
    sizes: tuple[int, ...]         # output rows of each part (embeddings: the dim)
    in_features: int               # (embeddings: the vocabulary)
    embedding: bool


def groups(cfg: ModelConfig, fmt: Format) -> dict[str, Group]:
    """Every module of `fmt` an adapter may sit on for `cfg`, by Hugging Face name."""
    shapes, out = cfg.shapes(), {}
    for theirs, ours in weight_plan(cfg, fmt).items():
        parts = tuple(n.removesuffix(".weight") for n in ours)
        if not all(short_name(p) in TARGETS for p in parts):
            continue                                            # norms
        embedding = parts == ("embed",)
        rows = [shapes[n][0] for n in ours]
        sizes, fan_in = ((shapes[ours[0]][1],), rows[0]) if embedding else (tuple(rows), shapes[ours[0]][1])
        out[theirs.removesuffix(".weight")] = Group(theirs.removesuffix(".weight"), parts, sizes, fan_in, embedding)
    return out


def targeted(cfg: ModelConfig, fmt: Format, targets) -> list[Group]:
    """The groups a LoraConfig's targets select; a fused module is targeted whole or not at all."""
    chosen, covered = [], set()
    for g in groups(cfg, fmt).values():
        names = [short_name(p) for p in g.parts]
        hit = [n in targets for n in names]
        if any(hit) and not all(hit):
            raise AdapterError(f"{fmt.architecture} stores {', '.join(names)} in one module "
                               f"({short_name(g.hf)}): target all of them or none")
        if all(hit):
            chosen.append(g)
            covered.update(names)
    for t in targets:
        if t not in covered:
            why = (" (its output layer is tied to the embeddings: target embed)" if t == "lm_head"
                   and cfg.tie_embeddings else "")
            raise AdapterError(f"LoRA target {t!r}: this {fmt.architecture} model has no such module{why}")
    return chosen


def model_format(model, format=None) -> Format:
    if format is None:
        format = getattr(model, "lora_format", None)
    if format is None:
        return default_format(model.config)
    if isinstance(format, Format):
        return format
    if format not in FORMATS:
        raise AdapterError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    return FORMATS[format]


# ---------------------------------------------------------------- the modules

class LoraLinear(nn.Module):
    """A frozen linear weight (plain, or NF4 with QLoRA) plus a low-rank update. The weight keeps
    its name and is the base's own Parameter, so the model's canonical names stay valid.
    rank 0: no adapter (a quantized projection that is not targeted)."""

    def __init__(self, weight: nn.Parameter, lora_A: nn.Parameter | None, out_features: int, scaling: float,
                 dropout: float = 0.0, dora: bool = False):
        super().__init__()
        self.weight = weight
        self.lora_A = lora_A
        rank, dev = (0, weight.device) if lora_A is None else (lora_A.shape[0], lora_A.device)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=dev)) if rank else None
        self.lora_magnitude = nn.Parameter(torch.ones(out_features, device=dev)) if rank and dora else None
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight)                       # torchao's linear_nf4 for an NF4 weight
        if self.lora_A is None or not self.enabled:
            return y
        xd = self.dropout(x)
        # fp32 adapters on a bf16 base: autocast casts them; without it, the input is cast (as PEFT)
        a = xd if torch.is_autocast_enabled(xd.device.type) else xd.to(self.lora_A.dtype)
        lora = F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling
        if self.lora_magnitude is None:
            return y + lora.to(y.dtype)
        w = dense(self.weight).to(a.dtype)
        norm = torch.linalg.norm(w + self.scaling * (self.lora_B @ self.lora_A).detach(), dim=1).detach()
        ratio = self.lora_magnitude / norm
        base = y if xd is x else F.linear(xd, self.weight)
        return y + ((ratio - 1) * base.to(a.dtype) + ratio * lora).to(y.dtype)


    def merged_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, W + s·B@A (DoRA: its rows rescaled to the
        magnitude over the detached norm), differentiable in the adapters: what the chunked loss
        multiplies the hidden states by when the output layer carries an adapter."""
        w = dense(self.weight)
        if self.lora_A is None or not self.enabled:
            return w
        if self.training and isinstance(self.dropout, nn.Dropout):
            raise AdapterError("LoRA dropout on lm_head: the loss multiplies by the output layer's merged weight, "
                               "which cannot drop inputs; use --lora-dropout 0 or leave lm_head out of --lora-targets")
        delta = (self.scaling * (self.lora_B @ self.lora_A)).to(w.dtype)
        if self.lora_magnitude is None:
            return w + delta
        norm = torch.linalg.norm(w + delta.detach(), dim=1).detach()
        return (self.lora_magnitude / norm).to(w.dtype)[:, None] * (w + delta)


class LoraEmbedding(nn.Module):
    """A frozen embedding table plus s (A^T[x] @ B^T); `weight` is the base's own Parameter (a
    tied output layer keeps using it as it is, as in PEFT)."""

    def __init__(self, weight: nn.Parameter, lora_A: nn.Parameter, dim: int, scaling: float):
        super().__init__()
        self.weight, self.lora_A = weight, lora_A
        self.lora_B = nn.Parameter(torch.zeros(dim, lora_A.shape[0], device=lora_A.device))
        self.lora_magnitude = None
        self.scaling, self.enabled = scaling, True

    def forward(self, tokens):
        y = F.embedding(tokens, self.weight)
        if not self.enabled:
            return y
        return y + (F.embedding(tokens, self.lora_A.T) @ self.lora_B.T * self.scaling).to(y.dtype)


ADAPTED = (LoraLinear, LoraEmbedding)


def dense(w: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor (an NF4 weight dequantized)."""
    return w.get_original_weight() if hasattr(w, "get_original_weight") else w


def adapter_modules(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ADAPTED) and m.lora_A is not None}


def adapter_parameters(model) -> dict[str, nn.Parameter]:
    """Every adapter parameter once, by the model's name for it (a shared A under its first module)."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("lora_")}


@contextlib.contextmanager
def disable_adapters(model):
    """Inside: the base model (every adapter off). DPO's reference, with no second model."""
    mods = [m for m in model.modules() if isinstance(m, ADAPTED)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(mods, before):
            m.enabled = was


# ---------------------------------------------------------------- applying

def apply_lora(model, config: LoraConfig, format: str | Format | None = None):
    """Put adapters on the modules `config.targets` names (the Hugging Face modules of `format`,
    default: the plainest format that holds the model), freeze every base weight, and with
    config.qlora store the projections in NF4. Works on a model on the meta device too (then
    load_lora_model fills it in). Returns the model; model.lora_config / lora_format record it."""
    if getattr(model, "lora_config", None) is not None:
        raise AdapterError("this model already has LoRA adapters")
    fmt = model_format(model, format)
    chosen = targeted(model.config, fmt, config.targets)
    if config.qlora:
        qlora_check(model.embed.weight.device)
    for p in model.parameters():
        p.requires_grad_(False)
    for g in chosen:
        base = [model.get_submodule(p) for p in g.parts]
        A = nn.Parameter(torch.zeros(config.rank, g.in_features, device=base[0].weight.device))
        for part, module, size in zip(g.parts, base, g.sizes):
            if g.embedding:
                new = LoraEmbedding(module.weight, A, size, config.scaling)
            else:
                new = LoraLinear(module.weight, A, size, config.scaling, config.dropout, config.dora)
            _replace(model, part, new)
    if config.qlora:
        for i in range(model.config.n_layers):
            for t in QUANTIZED:
                name = TARGETS[t].format(i=i)
                if not isinstance(model.get_submodule(name), LoraLinear):
                    _replace(model, name, LoraLinear(model.get_submodule(name).weight, None, 0, 0.0))
                quantize_weight(model.get_submodule(name))
    model.lora_config, model.lora_format = config, fmt.name
    if model.embed.weight.device.type != "meta":
        init_adapters(model)
    return model


def _replace(model, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def init_adapters(model):
    """PEFT's initialisation, shared A's once: a new adapter leaves the model's output unchanged."""
    seen = set()
    for m in adapter_modules(model).values():
        if id(m.lora_A) not in seen:
            seen.add(id(m.lora_A))
            if isinstance(m, LoraEmbedding):
                nn.init.zeros_(m.lora_A)
            else:
                nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
        if isinstance(m, LoraEmbedding):
            nn.init.normal_(m.lora_B)
        else:
            nn.init.zeros_(m.lora_B)
        if m.lora_magnitude is not None:
            m.lora_magnitude.copy_(torch.linalg.norm(dense(m.weight).float(), dim=1))


# ---------------------------------------------------------------- QLoRA (torchao NF4)

def _nf4():
    """torchao's NF4 module (its import is quiet about kernels this machine cannot load)."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor   # torchao >= 0.18
        except ImportError:
            from torchao.dtypes import nf4tensor as nf4_tensor                    # torchao <= 0.17
        return nf4_tensor
    except ImportError:
        raise AdapterError("--qlora needs torchao's NF4 tensor: pip install 'lmfoundry[qlora]'") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def to_nf4(w: torch.Tensor):
    """torchao's NF4Tensor of a 2-D weight: blocks of 64 values with an absmax each, the absmaxes
    double-quantized in blocks of 256 (fewer when the weight has fewer blocks: torchao needs whole
    scaler blocks)."""
    n_blocks = w.numel() // NF4_BLOCK
    return _nf4().to_nf4(w.detach().contiguous(), NF4_BLOCK, math.gcd(n_blocks, NF4_SCALER_BLOCK))


def quantize_weight(module: LoraLinear):
    """Replace the module's weight by its NF4 form (a weight that is not whole blocks stays as it is)."""
    w = module.weight
    if w.device.type == "meta" or w.numel() % NF4_BLOCK:
        return
    module.weight = nn.Parameter(to_nf4(w), requires_grad=False)


def qlora_check(device):
    """One clear error when the 4-bit path cannot run here: torchao missing, or its NF4 linear failing
    on this device (tried on a small weight, forward and backward)."""
    device = torch.device(device)
    if device.type == "meta":
        return
    _nf4()
    try:
        w = to_nf4(torch.randn(NF4_BLOCK, NF4_SCALER_BLOCK, device=device))
        x = torch.randn(2, NF4_SCALER_BLOCK, device=device, requires_grad=True)
        F.linear(x, w).sum().backward()
    except Exception as e:   # noqa: BLE001 - whatever torchao raises on this device, the user gets one line
        raise AdapterError(f"--qlora: torchao's NF4 linear cannot run on {device} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# ---------------------------------------------------------------- building straight into place

def load_lora_model(cfg: ModelConfig, loaders: dict | None, config: LoraConfig, format=None, device="cpu",
                    dtype=torch.float32, seed: int = 0):
    """A Transformer with adapters, its base weights read one at a time from `loaders` (canonical
    name -> zero-argument reader; None: drawn at random as Transformer.reset_parameters draws them)
    straight onto `device` in `dtype`, the projections quantized as they arrive with QLoRA: peak
    memory is the result plus one weight. Adapters are fp32, seeded with `seed`."""
    from .model import Transformer, rope_inv_freq
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_lora(model, config, format)
    if config.qlora:
        qlora_check(device)
    torch.manual_seed(seed)
    for name in cfg.shapes():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        t = loaders[name]() if loaders is not None else _random(name, cfg, device)
        setattr(module, attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        if config.qlora and isinstance(module, LoraLinear) and short_name(module_name) in QUANTIZED:
            quantize_weight(module)
    fresh: dict[int, nn.Parameter] = {}
    for m in adapter_modules(model).values():
        for attr in ("lora_A", "lora_B", "lora_magnitude"):
            p = getattr(m, attr)
            if p is not None:
                setattr(m, attr, fresh.setdefault(id(p), nn.Parameter(torch.empty_like(p, device=device))))
    model.inv_freq = rope_inv_freq(cfg).to(device)
    init_adapters(model)
    return model


def _random(name: str, cfg: ModelConfig, device) -> torch.Tensor:
    shape = cfg.shapes()[name]
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    return torch.empty(shape, device=device).normal_(0.0, cfg.init_std)


# ---------------------------------------------------------------- PEFT's format: writing

def peft_config(config: LoraConfig, cfg: ModelConfig, fmt: Format, base_model: str | None = None,
                task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> dict:
    """adapter_config.json of PEFT's LoraConfig (the keys PEFT and vLLM read, PEFT's defaults else)."""
    modules = sorted({short_name(g.hf) for g in targeted(cfg, fmt, config.targets)})
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "revision": None,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": modules, "bias": "none", "use_rslora": config.rslora, "use_dora": config.dora,
            "modules_to_save": modules_to_save, "fan_in_fan_out": False, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "inference_mode": True}


def peft_tensors(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor (fp32, CPU) of the model's adapters; `tensors` (adapter_parameters names,
    e.g. gathered under FSDP) instead of the model's own."""
    fmt = model_format(model)
    if tensors is None:
        tensors = {n: p.detach() for n, p in adapter_parameters(model).items()}

    def get(part, attr):   # a shared A is named after the first part, which registered it
        return tensors[f"{part}.{attr}"]

    out = {}
    for g in targeted(model.config, fmt, model.lora_config.targets):
        stem = PREFIX + g.hf
        A = get(g.parts[0], "lora_A")
        B = torch.cat([get(p, "lora_B") for p in g.parts])
        if g.embedding:
            out[stem + ".lora_embedding_A"], out[stem + ".lora_embedding_B"] = A, B
            continue
        out[stem + ".lora_A.weight"], out[stem + ".lora_B.weight"] = A, B
        if model.lora_config.dora:
            out[stem + ".lora_magnitude_vector"] = torch.cat([get(p, "lora_magnitude") for p in g.parts])
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_adapter(model, path, tensors: dict | None = None, base_model: str | None = None,
                 tokenizer_from=None, overwrite: bool = False, task_type: str = "CAUSAL_LM",
                 modules: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory (atomically): adapter_config.json,
    adapter_model.safetensors (fp32, PEFT's key names for the format's Hugging Face modules) and
    the tokenizer files of `tokenizer_from`. `modules`: whole weights trained beside the adapters
    by Hugging Face name ({"score.weight": ...}, a reward model with task_type "SEQ_CLS"), saved as
    PEFT saves modules_to_save: base_model.model.score.weight (peft/utils/other.py,
    ModulesToSaveWrapper; the adapter name is dropped)."""
    from safetensors.torch import save_file
    if getattr(model, "lora_config", None) is None:
        raise AdapterError("this model has no LoRA adapters to save")
    fmt, modules = model_format(model), modules or {}
    weights = peft_tensors(model, tensors)
    weights.update({PREFIX + name: t.detach().to("cpu", torch.float32).contiguous() for name, t in modules.items()})
    saved = sorted({name.rpartition(".")[0] for name in modules}) or None
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, peft_config(model.lora_config, model.config, fmt, base_model, task_type, saved))
        copy_tokenizer_files(tokenizer_from, tmp)
    return Path(path)


# ---------------------------------------------------------------- PEFT's format: reading

class Adapter:
    """A PEFT LoRA adapter directory, read and checked against a base model's config and format:
    every module it names must exist in that format with the shapes the config implies. `heads`:
    the whole modules (PEFT's modules_to_save) the caller reads from `saved` by weight name (a
    reward model's "score"); any other saved module is refused."""

    def __init__(self, path, cfg: ModelConfig, fmt: Format, heads: tuple[str, ...] = ()):
        self.path, self.cfg, self.fmt, self.heads = Path(path), cfg, fmt, heads
        self.saved: dict[str, torch.Tensor] = {}
        self.conf = self._read_config()
        self.modules = self._read_tensors()
        self.scaling: dict[str, float] = {}
        self.parts: dict[str, tuple[str, int, int]] = {}     # canonical weight -> (module, first row, rows)
        self._check()

    def _read_config(self) -> dict:
        file = self.path / CONFIG_NAME
        if not self.path.is_dir():
            raise AdapterError(f"{self.path}: adapter directory not found")
        if not file.is_file():
            raise AdapterError(f"{self.path}: no {CONFIG_NAME} (a PEFT LoRA adapter directory holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            conf = read_json(file)
        except CheckpointError as e:
            raise AdapterError(str(e)) from None
        if conf.get("peft_type") != "LORA":
            raise AdapterError(f"{file}: peft_type {conf.get('peft_type')!r}: only LoRA adapters are supported")
        for key, default in UNSUPPORTED.items():
            if conf.get(key, default) not in (default, [], {}) and not (key == "bias" and conf[key] is None):
                raise AdapterError(f"{file}: {key} = {conf[key]!r} is not supported (only {default!r})")
        for key in ("r", "lora_alpha"):
            value = conf.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise AdapterError(f"{file}: {key} must be a positive number, got {value!r}")
        return conf

    def _read_tensors(self) -> dict[str, dict]:
        from safetensors.torch import load_file
        file = self.path / WEIGHTS_NAME
        if not file.is_file():
            pickled = " (adapter_model.bin is pickled and never loaded)" if (self.path / "adapter_model.bin").exists() else ""
            raise AdapterError(f"{self.path}: no {WEIGHTS_NAME}{pickled}")
        try:
            tensors = load_file(str(file))
        except Exception as e:   # noqa: BLE001 - safetensors' own error types vary by version
            raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None
        modules: dict[str, dict] = {}
        for key, t in tensors.items():
            match = next(((key[len(PREFIX):-len(s)], slot) for s, slot in SUFFIXES.items()
                          if key.startswith(PREFIX) and key.endswith(s)), None)
            if match is None and self._saved_module(file, key, t):
                continue
            if match is None:
                raise AdapterError(f"{file}: unexpected tensor {key} (expected {PREFIX}<module>.lora_A.weight, "
                                   ".lora_B.weight, .lora_magnitude_vector or .lora_embedding_A/B)")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{file}: tensor {key} is not finite floating-point data")
            (module, (slot, _)) = match
            modules.setdefault(module, {})[slot] = (key, t)
        if not modules:
            raise AdapterError(f"{file}: holds no adapter tensors")
        return modules

    def _saved_module(self, file, key: str, t: torch.Tensor) -> bool:
        """Keep a whole module PEFT saved beside the adapter (modules_to_save) when the caller reads
        it; refuse it otherwise. False: `key` is no such module."""
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.rpartition(".")[0] not in (self.conf.get("modules_to_save") or []):
            return False
        if name.rpartition(".")[0] not in self.heads:
            raise AdapterError(f"{file}: {key} is a whole module saved beside the adapter (modules_to_save), "
                               "which only a reward model's score head may be (use it with `lmfoundry reward "
                               "score` or --reward)")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{file}: tensor {key} is not finite floating-point data")
        self.saved[name] = t
        return True

    def _check(self):
        file, conf = self.path / WEIGHTS_NAME, self.conf
        known = groups(self.cfg, self.fmt)
        for module, slots in self.modules.items():
            g = known.get(module)
            if g is None:
                raise AdapterError(f"{file}: module {module} does not exist in this {self.fmt.architecture} "
                                   f"base model (an adapter for another architecture or model?)")
            if g.embedding and "m" in slots:
                raise AdapterError(f"{file}: DoRA on the embeddings ({module}) is not supported")
            for slot in ("A", "B") + (("m",) if conf.get("use_dora") and not g.embedding else ()):
                if slot not in slots:
                    raise AdapterError(f"{file}: module {module} has no lora_{slot} tensor")
            rank = slots["A"][1].shape[0]
            out = sum(g.sizes)
            want = {"A": (rank, g.in_features), "B": (out, rank), "m": (out,),
                    "W": (g.in_features, out) if g.embedding else (out, g.in_features)}
            for slot, (key, t) in slots.items():
                if tuple(t.shape) != want[slot]:
                    raise AdapterError(f"{file}: {key} has shape {list(t.shape)}, but the base model's {module} "
                                       f"needs {list(want[slot])} (an adapter for another model size?)")
            self.scaling[module] = scaling(self._alpha(module), rank, bool(conf.get("use_rslora")))
            start = 0
            for part, size in zip(g.parts, g.sizes if not g.embedding else (g.in_features,)):
                self.parts[part + ".weight"] = (module, start, size)
                start += size

    def _alpha(self, module: str) -> float:
        """PEFT's alpha_pattern: a key matches a module whose name ends with it (regex allowed)."""
        for key, alpha in (self.conf.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return float(alpha)
        return float(self.conf["lora_alpha"])

    @property
    def dora(self) -> bool:
        return bool(self.conf.get("use_dora"))

    def delta_inputs(self, name: str):
        """(A, B rows, magnitude rows or None, scaling, embedding?, replacement base rows or None)
        for canonical weight `name`."""
        module, start, size = self.parts[name]
        slots, emb = self.modules[module], name == "embed.weight"
        A, B = slots["A"][1].float(), slots["B"][1].float()
        m = slots["m"][1].float()[start:start + size] if "m" in slots else None
        W = slots["W"][1] if "W" in slots else None
        rows = slice(None) if emb else slice(start, start + size)
        return A, B[rows], m, self.scaling[module], emb, None if W is None else W[rows]

    def fold(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Canonical weight `name` with the adapter folded in (in w's dtype; math in fp32)."""
        if name not in self.parts:
            return w
        if name == "embed.weight" and self.cfg.tie_embeddings:
            raise AdapterError(f"{self.path}: an embedding adapter cannot be folded into a model whose output "
                               "layer is tied to its embeddings (the merged table would change both)")
        A, B, m, s, emb, W = self.delta_inputs(name)
        merged = (w if W is None else W).float() + s * ((B @ A).T if emb else B @ A)
        if m is not None and not emb:
            merged = merged * (m / torch.linalg.norm(merged, dim=1))[:, None]
        return merged.to(w.dtype)

    def lora_config(self) -> LoraConfig:
        """The LoraConfig that reproduces this adapter in training modules (uniform rank and alpha)."""
        conf, known = self.conf, groups(self.cfg, self.fmt)
        ranks = {slots["A"][1].shape[0] for slots in self.modules.values()}
        if len(ranks) > 1 or len(set(self.scaling.values())) > 1:
            raise AdapterError(f"{self.path}: ranks or alphas differ per module (rank_pattern/alpha_pattern); "
                               "such an adapter can be folded (--adapter, lora merge) but not trained further")
        targets = tuple(dict.fromkeys(short_name(p) for mod in self.modules for p in known[mod].parts))
        return LoraConfig(rank=ranks.pop(), alpha=conf["lora_alpha"], dropout=float(conf.get("lora_dropout") or 0.0),
                          targets=targets, rslora=bool(conf.get("use_rslora")), dora=self.dora)


@torch.no_grad()
def load_adapter(model, path, format=None):
    """Put the adapter at `path` (ours or PEFT's) into the model: adapters are applied first when
    the model has none, else they must be the same (targets, rank, scaling). `format`: the Hugging
    Face format whose module names the adapter uses (default: the model's adapters', else the
    first format that can hold the model and has every module the adapter names)."""
    fmt = model_format(model, format)
    if format is None and getattr(model, "lora_format", None) is None:
        fmt = _adapter_format(path, model.config, fmt)
    adapter = Adapter(path, model.config, fmt)
    want = adapter.lora_config()
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, want, fmt)
    have = model.lora_config
    if (set(have.targets), have.rank, have.scaling, have.dora) != (set(want.targets), want.rank, want.scaling,
                                                                     want.dora):
        raise AdapterError(f"{path}: the adapter (targets {','.join(want.targets)}, rank {want.rank}) differs from "
                           f"the model's adapters (targets {','.join(have.targets)}, rank {have.rank})")
    layers = {g.hf for g in targeted(model.config, fmt, have.targets)}
    if set(adapter.modules) != layers:
        missing = sorted(layers - set(adapter.modules))
        raise AdapterError(f"{path}: no weights for {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    for name, (module, start, size) in adapter.parts.items():
        A, B, m, _, _, W = adapter.delta_inputs(name)
        target = model.get_submodule(name.removesuffix(".weight"))
        if W is not None:
            target.weight.copy_(W)
        target.lora_A.copy_(A)
        target.lora_B.copy_(B)
        if m is not None:
            target.lora_magnitude.copy_(m)
    return model


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def adapter_base(path) -> Path:
    """The base model directory an adapter names (adapter_config.json's base_model_name_or_path)."""
    file = Path(path) / CONFIG_NAME
    try:
        base = read_json(file).get("base_model_name_or_path")
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    if not base or not Path(base).is_dir():
        raise AdapterError(f"{file}: base_model_name_or_path {base!r} is not a checkpoint directory here "
                           "(the adapter's base model is needed to use it)")
    return Path(base)


def _adapter_format(path, cfg: ModelConfig, default: Format) -> Format:
    for fmt in [default] + [f for f in FORMATS.values() if f is not default and refusal(cfg, f) is None]:
        try:
            Adapter(path, cfg, fmt)
            return fmt
        except AdapterError:
            continue
    return default
