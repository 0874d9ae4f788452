"""ModelConfig: everything that decides the shape and the forward of a model.

Every seed architecture (LLaMA, Mistral, SOLAR, Solar Pro, OpenELM, EXAONE) is the same
decoder-only transformer with a different ModelConfig. Per-layer quantities are lists, so
OpenELM's layer-wise scaling is just config; Solar Pro's weighted skip connections are two
lists of layer-index lists plus a (training, inference) pair of blend weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int                                   # hidden size
    n_layers: int
    n_heads: list[int] | int                   # query heads, per layer
    n_kv_heads: list[int] | int | None = None  # key/value heads, per layer (None: = n_heads)
    ffn_dim: list[int] | int = 0               # SwiGLU inner width, per layer
    head_dim: int | None = None                # None: dim // n_heads (must then be uniform)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear", "factor": f}
    # or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #     "original_max_position_embeddings"} (transformers' keys)
    rope_scaling: dict | None = None
    qk_norm: bool = False                      # RMSNorm over head_dim on q and k, before RoPE (OpenELM)
    tie_embeddings: bool = False
    sliding_window: int | None = None          # each query sees itself and the window-1 keys before it
    max_seq_len: int = 4096
    # Solar Pro's weighted layer skip connections ("bskcn"). Slot s: before layer i runs,
    # if i in skip_save[s] the residual stream is saved in slot s; if i in skip_blend[s]
    # it becomes w*saved[s] + (1-w)*x, with w = skip_weights[0] in training, [1] in eval.
    skip_save: list[list[int]] = field(default_factory=list)
    skip_blend: list[list[int]] = field(default_factory=list)
    skip_weights: tuple[float, float] = (0.9, 0.8)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self):
        L = self.n_layers
        if not isinstance(L, int) or L < 1:
            raise ConfigError(f"n_layers must be a positive integer, got {L!r}")
        self.n_heads = _per_layer("n_heads", self.n_heads, L)
        self.n_kv_heads = _per_layer("n_kv_heads", self.n_heads if self.n_kv_heads is None else self.n_kv_heads, L)
        self.ffn_dim = _per_layer("ffn_dim", self.ffn_dim, L)
        if self.head_dim is None:
            if len(set(self.n_heads)) != 1 or self.dim % self.n_heads[0]:
                raise ConfigError("head_dim must be given when heads differ per layer or do not divide dim")
            self.head_dim = self.dim // self.n_heads[0]
        for name in ("vocab_size", "dim", "head_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for i, (h, kv, f) in enumerate(zip(self.n_heads, self.n_kv_heads, self.ffn_dim)):
            if h < 1 or kv < 1 or f < 1:
                raise ConfigError(f"layer {i}: heads, kv heads and ffn_dim must be positive (got {h}, {kv}, {f})")
            if h % kv:
                raise ConfigError(f"layer {i}: n_heads {h} is not a multiple of n_kv_heads {kv}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError("norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        self.skip_save = [sorted(int(i) for i in s) for s in self.skip_save]
        self.skip_blend = [sorted(int(i) for i in s) for s in self.skip_blend]
        if len(self.skip_save) != len(self.skip_blend):
            raise ConfigError("skip_save and skip_blend must have one list per slot (same length)")
        for s, (saves, blends) in enumerate(zip(self.skip_save, self.skip_blend)):
            for i in saves + blends:
                if not 0 <= i < L:
                    raise ConfigError(f"skip connection slot {s}: layer {i} is outside 0..{L - 1}")
            if blends and (not saves or blends[0] <= saves[0]):
                raise ConfigError(f"skip connection slot {s}: blend at layer {blends[0]} before any save")
        self.skip_weights = tuple(float(w) for w in self.skip_weights)
        if len(self.skip_weights) != 2:
            raise ConfigError("skip_weights must be (training weight, inference weight)")

    # ----- derived facts -------------------------------------------------------------

    @property
    def has_skips(self) -> bool:
        return any(self.skip_blend)

    @property
    def uniform(self) -> bool:
        """True when every layer has the same heads and FFN width (what Llama can express)."""
        return len(set(zip(self.n_heads, self.n_kv_heads, self.ffn_dim))) == 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter name -> shape, computed without allocating anything.

        The Transformer's state_dict has exactly these names and shapes; checkpoint
        formats translate to and from them.
        """
        d, hd, V = self.dim, self.head_dim, self.vocab_size
        out: dict[str, tuple[int, ...]] = {"embed.weight": (V, d)}
        for i in range(self.n_layers):
            h, kv, f = self.n_heads[i], self.n_kv_heads[i], self.ffn_dim[i]
            p = f"layers.{i}."
            out[p + "attn_norm.weight"] = (d,)
            out[p + "attn.q.weight"] = (h * hd, d)
            out[p + "attn.k.weight"] = (kv * hd, d)
            out[p + "attn.v.weight"] = (kv * hd, d)
            if self.qk_norm:
                out[p + "attn.q_norm.weight"] = (hd,)
                out[p + "attn.k_norm.weight"] = (hd,)
            out[p + "attn.o.weight"] = (d, h * hd)
            out[p + "mlp_norm.weight"] = (d,)
            out[p + "mlp.gate.weight"] = (f, d)
            out[p + "mlp.up.weight"] = (f, d)
            out[p + "mlp.down.weight"] = (d, f)
        out["norm.weight"] = (d,)
        if not self.tie_embeddings:
            out["lm_head.weight"] = (V, d)
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name](), **overrides})


def _per_layer(name, value, n_layers) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n_layers
    try:
        values = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer or a list of integers, got {value!r}") from None
    if len(values) != n_layers:
        raise ConfigError(f"{name} has {len(values)} entries but the model has {n_layers} layers")
    return values


def _check_rope_scaling(rs: dict | None) -> dict | None:
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    required = {"linear": ["factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}[kind]
    missing = [k for k in required if k not in rs]
    if missing:
        raise ConfigError(f"rope_scaling type {kind!r} needs {', '.join(missing)}")
    return {"rope_type": kind, **{k: rs[k] for k in required}}


# ----- OpenELM layer-wise scaling ------------------------------------------------------

def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round v to a multiple of divisor, never going below 90% of v (corenet math_utils)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def openelm_layerwise(dim: int, n_layers: int, head_dim: int,
                      qkv_multipliers: tuple[float, float] | float = (0.5, 1.0),
                      ffn_multipliers: tuple[float, float] | list[float] | float = (0.5, 4.0),
                      gqa_group: int = 4, ffn_divisor: int = 256) -> dict[str, list[int]]:
    """Per-layer query heads, kv heads and FFN widths by OpenELM's layer-wise scaling.

    alpha_i and beta_i are np.linspace(min, max, L) rounded to 2 decimals (as corenet's
    GPTConfig.__post_init__). `gqa_group` is OpenELM's `num_gqa_groups`: query heads per kv
    head (not the number of groups). `ffn_multipliers` may also be a full per-layer list, as
    the Hugging Face OpenELM config stores it.
    """
    import numpy as np

    def spread(m):
        if isinstance(m, (int, float)):
            return [float(m)] * n_layers
        m = list(m)
        if len(m) == n_layers and n_layers != 2:
            return [float(v) for v in m]
        if len(m) != 2:
            raise ConfigError(f"multipliers must be a number, a (min, max) pair or a list of {n_layers}")
        return [round(v, 2) for v in np.linspace(m[0], m[1], num=n_layers, dtype=float)]

    q_dims = [make_divisible(dim * a, head_dim * gqa_group) for a in spread(qkv_multipliers)]
    n_heads = [q // head_dim for q in q_dims]
    return {
        "n_heads": n_heads,
        "n_kv_heads": [h // gqa_group for h in n_heads],
        "ffn_dim": [make_divisible(b * dim, ffn_divisor) for b in spread(ffn_multipliers)],
    }


# ----- presets: data, not code ---------------------------------------------------------

def _llama(vocab, dim, layers, heads, kv, ffn, **kw):
    return dict(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn, **kw)


def _openelm(dim, layers, head_dim, **kw):
    return dict(vocab_size=32000, dim=dim, n_layers=layers, head_dim=head_dim, norm_eps=1e-6, qk_norm=True,
                tie_embeddings=True, max_seq_len=2048, **openelm_layerwise(dim, layers, head_dim), **kw)


# Solar Pro's bskcn_1..4 and bskcn_tv (upstage/solar-pro-preview-instruct config.json).
SOLAR_PRO_SKIPS = dict(skip_save=[[12, 20, 32, 44], [20, 32]], skip_blend=[[16, 24, 36, 48], [28, 40]],
                       skip_weights=(0.9, 0.8))

PRESETS = {
    # tiny sizes for tests and demos (seconds on a CPU)
    "tiny": lambda: _llama(512, 64, 2, 4, 2, 128, max_seq_len=256),
    "tiny-mistral": lambda: _llama(512, 64, 2, 4, 2, 128, max_seq_len=256, sliding_window=16),
    "tiny-solar-pro": lambda: _llama(512, 64, 8, 4, 2, 128, max_seq_len=256, sliding_window=64,
                                     skip_save=[[1, 3], [3]], skip_blend=[[2, 5], [6]]),
    "tiny-openelm": lambda: dict(vocab_size=512, dim=64, n_layers=4, head_dim=16, norm_eps=1e-6, qk_norm=True,
                                 tie_embeddings=True, max_seq_len=256,
                                 **openelm_layerwise(64, 4, 16, gqa_group=2, ffn_divisor=32)),
    "tiny-exaone": lambda: _llama(512, 64, 2, 4, 2, 128, max_seq_len=256, rope_theta=500000.0,
                                  norm_eps=1e-5, eos_token_id=3),
    # ~100M-parameter Llama shape used by benchmarks/
    "llama-100m": lambda: _llama(32000, 768, 12, 12, 4, 2048, max_seq_len=2048),
    # published shapes
    "llama-2-7b": lambda: _llama(32000, 4096, 32, 32, 32, 11008),
    "llama-2-13b": lambda: _llama(32000, 5120, 40, 40, 40, 13824),
    "llama-3-8b": lambda: _llama(128256, 4096, 32, 32, 8, 14336, rope_theta=500000.0, max_seq_len=8192,
                                 norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": lambda: _llama(128256, 4096, 32, 32, 8, 14336, rope_theta=500000.0, max_seq_len=131072,
                                   bos_token_id=128000, eos_token_id=128001,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192}),
    "mistral-7b": lambda: _llama(32000, 4096, 32, 32, 8, 14336, max_seq_len=32768, sliding_window=4096),
    "solar-10.7b": lambda: _llama(32000, 4096, 48, 32, 8, 14336),
    "solar-pro-22b": lambda: _llama(32128, 5120, 64, 40, 10, 17920, sliding_window=2047, eos_token_id=32007,
                                    **SOLAR_PRO_SKIPS),
    "exaone-3.0-7.8b": lambda: _llama(102400, 4096, 32, 32, 8, 14336, rope_theta=500000.0,
                                      bos_token_id=1, eos_token_id=361, pad_token_id=0),
    "openelm-270m": lambda: _openelm(1280, 16, 64),
    "openelm-450m": lambda: _openelm(1536, 20, 64),
    "openelm-1.1b": lambda: _openelm(2048, 28, 64),
    "openelm-3b": lambda: _openelm(3072, 36, 128),
}
