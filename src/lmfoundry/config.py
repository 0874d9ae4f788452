"""ModelConfig: everything that decides the shape and the forward of a model.

Every seed architecture (LLaMA, Mistral, SOLAR, Solar Pro, OpenELM, EXAONE) is the same
decoder-only transformer with a different ModelConfig. Per-layer quantities are lists, so
OpenELM's layer-wise scaling is just config; Solar Pro's weighted skip connections are two
lists of layer-index lists plus a (training, inference) pair of blend weights.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import InitVar, dataclass, field

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
    # Not stored: the name each field has where the user wrote it (e.g. config.json's keys, with
    # "skip_save[0]" for one slot), so that errors speak the user's vocabulary, not ours.
    names: InitVar[dict[str, str] | None] = None

    def __post_init__(self, names=None):
        def name(field_name: str) -> str:
            return (names or {}).get(field_name, field_name)

        for key in ("vocab_size", "dim", "n_layers", "max_seq_len"):
            check_positive_int(name(key), getattr(self, key))
        L = self.n_layers
        self.n_heads = _per_layer(name("n_heads"), self.n_heads, L)
        kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.n_kv_heads = _per_layer(name("n_kv_heads"), kv_heads, L)
        self.ffn_dim = _per_layer(name("ffn_dim"), self.ffn_dim, L)
        if self.head_dim is None:
            if len(set(self.n_heads)) != 1 or self.dim % self.n_heads[0]:
                raise ConfigError(f"{name('head_dim')} must be given when {name('n_heads')} differs per layer or "
                                  f"does not divide {name('dim')}")
            self.head_dim = self.dim // self.n_heads[0]
        check_positive_int(name("head_dim"), self.head_dim)
        for i, (h, kv) in enumerate(zip(self.n_heads, self.n_kv_heads)):
            if h % kv:
                where = "" if self.uniform else f"layer {i}: "
                raise ConfigError(f"{where}{name('n_heads')} {h} is not a multiple of {name('n_kv_heads')} {kv}")
        if self.head_dim % 2:
            raise ConfigError(f"{name('head_dim')} must be even for RoPE, got {self.head_dim}")
        for key in ("norm_eps", "rope_theta"):
            if not _is_number(getattr(self, key)) or getattr(self, key) <= 0:
                raise ConfigError(f"{name(key)} must be a positive number, got {getattr(self, key)!r}")
        self.rope_theta = float(self.rope_theta)
        if self.sliding_window is not None:
            check_positive_int(name("sliding_window"), self.sliding_window)
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, name("rope_scaling"))
        self._check_skips(name)

    def _check_skips(self, name):
        if len(self.skip_save) != len(self.skip_blend):
            raise ConfigError("skip_save and skip_blend must have one list per slot (same length)")
        for kind in ("skip_save", "skip_blend"):
            slots = getattr(self, kind)
            for s, layers in enumerate(slots):
                if not isinstance(layers, (list, tuple)) or not all(_is_int(i) for i in layers):
                    raise ConfigError(f"{name(f'{kind}[{s}]')} must be a list of layer indices, got {layers!r}")
                outside = [i for i in layers if not 0 <= i < self.n_layers]
                if outside:
                    raise ConfigError(f"{name(f'{kind}[{s}]')}: layer {outside[0]} is outside 0..{self.n_layers - 1}")
            setattr(self, kind, [sorted(int(i) for i in layers) for layers in slots])
        for s, (saves, blends) in enumerate(zip(self.skip_save, self.skip_blend)):
            if blends and (not saves or blends[0] <= saves[0]):
                raise ConfigError(f"{name(f'skip_blend[{s}]')}: blend at layer {blends[0]} before any save "
                                  f"({name(f'skip_save[{s}]')} {saves})")
        weights = self.skip_weights
        if not isinstance(weights, (list, tuple)) or len(weights) != 2 or not all(map(_is_number, weights)):
            raise ConfigError(f"{name('skip_weights')} must be (training weight, inference weight), got {weights!r}")
        self.skip_weights = tuple(float(w) for w in weights)

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
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value):
    """Raise a ConfigError naming `name` unless value is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _per_layer(name: str, value, n_layers: int) -> list[int]:
    """One positive integer for every layer, or a list of one per layer."""
    if not isinstance(value, (list, tuple)):
        check_positive_int(name, value)
        return [int(value)] * n_layers
    if not all(_is_int(v) and v >= 1 for v in value):
        raise ConfigError(f"{name} must be a positive integer per layer, got {list(value)!r}")
    if len(value) != n_layers:
        raise ConfigError(f"{name} has {len(value)} entries but the model has {n_layers} layers")
    return [int(v) for v in value]


def _check_rope_scaling(rs, name: str = "rope_scaling") -> dict | None:
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{name} must be a mapping with a rope_type, got {rs!r}")
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{name}: rope_type {kind!r} is not supported (supported: linear, llama3)")
    required = {"linear": ["factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}[kind]
    missing = [k for k in required if k not in rs]
    if missing:
        raise ConfigError(f"{name}: rope_type {kind!r} needs {', '.join(missing)}")
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

    def spread(m, name):
        if _is_number(m):
            return [float(m)] * n_layers
        if not isinstance(m, (list, tuple)) or len(m) not in (2, n_layers) or not all(map(_is_number, m)):
            raise ConfigError(f"{name} must be a number, a (min, max) pair or a list of {n_layers} numbers, "
                              f"got {m!r}")
        if len(m) == n_layers and n_layers != 2:
            return [float(v) for v in m]
        return [round(v, 2) for v in np.linspace(m[0], m[1], num=n_layers, dtype=float)]

    q_dims = [make_divisible(dim * a, head_dim * gqa_group) for a in spread(qkv_multipliers, "qkv_multipliers")]
    n_heads = [q // head_dim for q in q_dims]
    return {
        "n_heads": n_heads,
        "n_kv_heads": [h // gqa_group for h in n_heads],
        "ffn_dim": [make_divisible(b * dim, ffn_divisor) for b in spread(ffn_multipliers, "ffn_multipliers")],
    }


# ----- presets: data, not code ---------------------------------------------------------
# Each preset is the keyword arguments of a ModelConfig; what a family shares sits in one dict.

TINY = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
LLAMA_3_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                  rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
OPENELM = dict(vocab_size=32000, norm_eps=1e-6, qk_norm=True, tie_embeddings=True, max_seq_len=2048)
# Solar Pro's bskcn_1..4 and bskcn_tv (upstage/solar-pro-preview-instruct config.json).
SOLAR_PRO_SKIPS = dict(skip_save=[[12, 20, 32, 44], [20, 32]], skip_blend=[[16, 24, 36, 48], [28, 40]],
                       skip_weights=(0.9, 0.8))


def _layerwise(preset: dict, gqa_group: int = 4, ffn_divisor: int = 256) -> dict:
    """An OpenELM preset completed with per-layer heads and FFN widths (openelm_layerwise of its
    dim, n_layers and head_dim, with OpenELM's default multipliers)."""
    return dict(preset, **openelm_layerwise(preset["dim"], preset["n_layers"], preset["head_dim"],
                                            gqa_group=gqa_group, ffn_divisor=ffn_divisor))


PRESETS: dict[str, dict] = {
    # tiny sizes for tests and demos (seconds on a CPU)
    "tiny": TINY,
    "tiny-mistral": dict(TINY, sliding_window=16),
    "tiny-solar-pro": dict(TINY, n_layers=8, sliding_window=64, skip_save=[[1, 3], [3]], skip_blend=[[2, 5], [6]]),
    "tiny-openelm": _layerwise(dict(OPENELM, vocab_size=512, dim=64, n_layers=4, head_dim=16, max_seq_len=256),
                               gqa_group=2, ffn_divisor=32),
    "tiny-exaone": dict(TINY, rope_theta=500000.0, norm_eps=1e-5, eos_token_id=3),
    # ~100M-parameter Llama shape used by benchmarks/
    "llama-100m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                       max_seq_len=2048),
    # published shapes
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama-2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-3-8b": dict(LLAMA_3_8B, max_seq_len=8192),
    "llama-3.1-8b": dict(LLAMA_3_8B, max_seq_len=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=32768, sliding_window=4096),
    "solar-10.7b": dict(vocab_size=32000, dim=4096, n_layers=48, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "solar-pro-22b": dict(vocab_size=32128, dim=5120, n_layers=64, n_heads=40, n_kv_heads=10, ffn_dim=17920,
                          sliding_window=2047, eos_token_id=32007, **SOLAR_PRO_SKIPS),
    "exaone-3.0-7.8b": dict(vocab_size=102400, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                            rope_theta=500000.0, bos_token_id=1, eos_token_id=361, pad_token_id=0),
    "openelm-270m": _layerwise(dict(OPENELM, dim=1280, n_layers=16, head_dim=64)),
    "openelm-450m": _layerwise(dict(OPENELM, dim=1536, n_layers=20, head_dim=64)),
    "openelm-1.1b": _layerwise(dict(OPENELM, dim=2048, n_layers=28, head_dim=64)),
    "openelm-3b": _layerwise(dict(OPENELM, dim=3072, n_layers=36, head_dim=128)),
}
