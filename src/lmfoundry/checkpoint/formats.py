"""Architectures as formats: config-key translations and weight-name tables.

Each format maps a Hugging Face directory (config.json + safetensors) to the canonical
ModelConfig and parameter names of `lmfoundry.model.Transformer`, and back. A weight table
maps a Hugging Face name template to a canonical one; a tuple of canonical names means the
checkpoint stores them fused, concatenated along dim 0 (OpenELM's qkv_proj and proj_1).
Adding an architecture means adding a table here, never a model class.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ..config import ModelConfig, check_positive_int, openelm_layerwise
from ..errors import ConfigError

# ----- weight tables ---------------------------------------------------------------------

LLAMA_WEIGHTS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# EXAONE 3.0: Llama math under GPT-2-like names; c_fc_0 is the gate, c_fc_1 the up projection.
EXAONE_WEIGHTS = {
    "transformer.wte.weight": "embed.weight",
    "transformer.h.{i}.ln_1.weight": "layers.{i}.attn_norm.weight",
    "transformer.h.{i}.attn.attention.q_proj.weight": "layers.{i}.attn.q.weight",
    "transformer.h.{i}.attn.attention.k_proj.weight": "layers.{i}.attn.k.weight",
    "transformer.h.{i}.attn.attention.v_proj.weight": "layers.{i}.attn.v.weight",
    "transformer.h.{i}.attn.attention.out_proj.weight": "layers.{i}.attn.o.weight",
    "transformer.h.{i}.ln_2.weight": "layers.{i}.mlp_norm.weight",
    "transformer.h.{i}.mlp.c_fc_0.weight": "layers.{i}.mlp.gate.weight",
    "transformer.h.{i}.mlp.c_fc_1.weight": "layers.{i}.mlp.up.weight",
    "transformer.h.{i}.mlp.c_proj.weight": "layers.{i}.mlp.down.weight",
    "transformer.ln_f.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# OpenELM: fused qkv ([q heads | k heads | v heads]) and fused gate/up (first half = gate).
OPENELM_WEIGHTS = {
    "transformer.token_embeddings.weight": "embed.weight",
    "transformer.layers.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "transformer.layers.{i}.attn.qkv_proj.weight": ("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight",
                                                    "layers.{i}.attn.v.weight"),
    "transformer.layers.{i}.attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "transformer.layers.{i}.attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "transformer.layers.{i}.attn.out_proj.weight": "layers.{i}.attn.o.weight",
    "transformer.layers.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "transformer.layers.{i}.ffn.proj_1.weight": ("layers.{i}.mlp.gate.weight", "layers.{i}.mlp.up.weight"),
    "transformer.layers.{i}.ffn.proj_2.weight": "layers.{i}.mlp.down.weight",
    "transformer.norm.weight": "norm.weight",
}

# Tensors some checkpoints carry that hold no information for us.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# ----- config keys: ModelConfig field -> config.json key --------------------------------

LLAMA_KEYS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size",
    "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
    "max_seq_len": "max_position_embeddings", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id", "init_std": "initializer_range",
}
EXAONE_KEYS = {**LLAMA_KEYS, "n_layers": "num_layers", "norm_eps": "layer_norm_epsilon"}
# Solar Pro's skip connections: two slots, each a list of save layers and a list of blend layers.
SOLAR_KEYS = {"skip_save[0]": "bskcn_1", "skip_save[1]": "bskcn_2", "skip_blend[0]": "bskcn_3",
              "skip_blend[1]": "bskcn_4", "skip_weights": "bskcn_tv"}
# OpenELM: the per-layer lists are computed from multipliers, as its own config class does
# (the num_query_heads and num_kv_heads it also stores are written, never read).
OPENELM_KEYS = {
    "vocab_size": "vocab_size", "dim": "model_dim", "n_layers": "num_transformer_layers", "head_dim": "head_dim",
    "qk_norm": "normalize_qk_projections", "rope_theta": "rope_freq_constant", "max_seq_len": "max_context_length",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "init_std": "initializer_range",
    "n_heads": "qkv_multipliers", "n_kv_heads": "num_gqa_groups", "ffn_dim": "ffn_multipliers",
}
# Defaults of each architecture's Python config class, used when config.json omits a key.
LLAMA_DEFAULTS = {"norm_eps": 1e-6, "tie_embeddings": False, "max_seq_len": 2048, "init_std": 0.02}
EXAONE_DEFAULTS = {"norm_eps": 1e-6, "tie_embeddings": True, "max_seq_len": 2048, "init_std": 0.02}
REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim")


@dataclass(frozen=True)
class Format:
    name: str
    architecture: str
    model_type: str
    weights: dict
    keys: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    # what the format can express beyond plain Llama
    supports: frozenset = frozenset()
    extra_in: Callable[[dict, dict], None] | None = None    # (hf config, our fields) -> fills fields
    extra_out: Callable[[ModelConfig, dict], None] | None = None
    config_in: Callable | None = None                      # replaces the key-table reading
    config_out: Callable | None = None
    act_key: str = "hidden_act"
    # fields read outside `keys` -> the config.json key they come from (errors name that key)
    other_keys: dict = field(default_factory=dict)
    head: str = "lm"              # "score": a sequence classifier (reward model), no LM head (SEQ_CLS below)

    @property
    def names(self) -> dict[str, str]:
        """ModelConfig field -> the key a config.json of this format holds it under."""
        return {**self.keys, **self.other_keys}


def _missing(path, key):
    return ConfigError(f"{path}: missing required key {key!r}")


def _rope_in(hf: dict) -> dict:
    """rope_theta and rope_scaling from the legacy keys or transformers 5's rope_parameters."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    return {"rope_theta": theta, "rope_scaling": scaling}


def _rope_names(hf: dict) -> dict:
    """Where _rope_in found rope_theta and rope_scaling, for errors."""
    params = hf.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    return {"rope_scaling": "rope_parameters",
            "rope_theta": "rope_parameters.rope_theta" if "rope_theta" in params else "rope_theta"}


def _keys_in(fmt: Format, hf: dict, path: str) -> dict:
    fields = dict(fmt.defaults)
    for ours, theirs in fmt.keys.items():
        if hf.get(theirs) is not None:
            fields[ours] = hf[theirs]
        elif ours in REQUIRED:
            raise _missing(path, theirs)
    fields.update(_rope_in(hf))
    act = hf.get(fmt.act_key, "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{path}: activation {act!r} is not supported (SwiGLU with silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{path}: {flag}=true is not supported (lmfoundry models have no biases)")
    return fields


def _keys_out(fmt: Format, cfg: ModelConfig) -> dict:
    out = {"architectures": [fmt.architecture], "model_type": fmt.model_type}
    for ours, theirs in fmt.keys.items():
        value = getattr(cfg, ours)
        out[theirs] = value[0] if isinstance(value, list) and ours in ("n_heads", "n_kv_heads", "ffn_dim") else value
    out[fmt.act_key] = "silu"
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = cfg.rope_scaling
    out["attention_bias"] = False
    out["mlp_bias"] = False
    return out


# Solar Pro's bskcn_1..4: two save lists, then two blend lists; bskcn_tv = (train, inference).
def _solar_in(hf: dict, fields: dict):
    from ..config import SOLAR_PRO_SKIPS as d   # vLLM substitutes these where a key is null

    def get(key, default):
        return hf[key] if hf.get(key) is not None else default
    fields["skip_save"] = [get("bskcn_1", d["skip_save"][0]), get("bskcn_2", d["skip_save"][1])]
    fields["skip_blend"] = [get("bskcn_3", d["skip_blend"][0]), get("bskcn_4", d["skip_blend"][1])]
    fields["skip_weights"] = get("bskcn_tv", d["skip_weights"])
    fields["sliding_window"] = hf.get("sliding_window", 2047)


def _solar_out(cfg: ModelConfig, out: dict):
    slots = list(zip(cfg.skip_save, cfg.skip_blend)) + [([], [])] * (2 - len(cfg.skip_save))
    out.update(bskcn_1=slots[0][0], bskcn_2=slots[1][0], bskcn_3=slots[0][1], bskcn_4=slots[1][1],
               bskcn_tv=list(cfg.skip_weights), sliding_window=cfg.sliding_window)


def _mistral_in(hf: dict, fields: dict):
    fields["sliding_window"] = hf.get("sliding_window")


def _mistral_out(cfg: ModelConfig, out: dict):
    out["sliding_window"] = cfg.sliding_window


# OpenELM stores multipliers; its config class recomputes per-layer heads from them on load.
OPENELM_DEFAULTS = {"norm_eps": 1e-6, "tie_embeddings": True, "qk_norm": False, "rope_theta": 10000.0,
                    "max_seq_len": 2048, "bos_token_id": 1, "eos_token_id": 2, "init_std": 0.02}


def _openelm_in(hf: dict, path: str) -> dict:
    for key in ("model_dim", "num_transformer_layers", "head_dim", "vocab_size"):
        if hf.get(key) is None:
            raise _missing(path, key)
    if not hf.get("ffn_with_glu", True) or hf.get("normalization_layer_name", "rms_norm") != "rms_norm":
        raise ConfigError(f"{path}: only OpenELM with GLU feed-forward and RMSNorm is supported")
    if not hf.get("share_input_output_layers", True):
        raise ConfigError(f"{path}: OpenELM without shared input/output embeddings is not supported")
    try:   # the layer-wise scaling needs sound integers before ModelConfig can check them
        for key in ("model_dim", "num_transformer_layers", "head_dim", "num_gqa_groups", "ffn_dim_divisor"):
            if key in hf:
                check_positive_int(key, hf[key])
        sizes = openelm_layerwise(hf["model_dim"], hf["num_transformer_layers"], hf["head_dim"],
                                  hf.get("qkv_multipliers", (0.5, 1.0)), hf.get("ffn_multipliers", (0.5, 4.0)),
                                  gqa_group=hf.get("num_gqa_groups", 1), ffn_divisor=hf.get("ffn_dim_divisor", 256))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    fields = dict(OPENELM_DEFAULTS, **{ours: hf[theirs] for ours, theirs in OPENELM_KEYS.items()
                                       if ours not in sizes and hf.get(theirs) is not None}, **sizes)
    return dict(fields, qk_norm=bool(fields["qk_norm"]))


def _openelm_out(cfg: ModelConfig) -> dict:
    d, L, hd = cfg.dim, cfg.n_layers, cfg.head_dim
    groups = {h // kv for h, kv in zip(cfg.n_heads, cfg.n_kv_heads)}
    if len(groups) != 1:
        raise ConfigError("OpenELM needs the same query heads per kv head in every layer")
    g = groups.pop()
    qkv = [cfg.n_heads[0] * hd / d, cfg.n_heads[-1] * hd / d]
    divisor = math.gcd(256, *cfg.ffn_dim)
    ffn = [f / d for f in cfg.ffn_dim]
    if openelm_layerwise(d, L, hd, qkv, ffn, gqa_group=g, ffn_divisor=divisor) != {
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim}:
        raise ConfigError("these per-layer head counts cannot be written as OpenELM's qkv_multipliers "
                          "(a linear alpha schedule rounded by its make_divisible rule)")
    return {"architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "model_dim": d,
            "num_transformer_layers": L, "head_dim": hd, "num_gqa_groups": g, "qkv_multipliers": qkv,
            "ffn_multipliers": ffn, "ffn_dim_divisor": divisor, "ffn_with_glu": True,
            "num_query_heads": cfg.n_heads, "num_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
            "normalize_qk_projections": cfg.qk_norm, "normalization_layer_name": "rms_norm",
            "activation_fn_name": "swish", "share_input_output_layers": True,
            "rope_freq_constant": cfg.rope_theta, "rope_max_length": max(4096, 2 * cfg.max_seq_len),
            "max_context_length": cfg.max_seq_len, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "initializer_range": cfg.init_std}


FORMATS = {f.name: f for f in [
    Format("llama", "LlamaForCausalLM", "llama", LLAMA_WEIGHTS, LLAMA_KEYS, LLAMA_DEFAULTS,
           frozenset({"head_dim", "rope_scaling"})),
    Format("mistral", "MistralForCausalLM", "mistral", LLAMA_WEIGHTS, LLAMA_KEYS, LLAMA_DEFAULTS,
           frozenset({"head_dim", "rope_scaling", "sliding_window"}), _mistral_in, _mistral_out),
    Format("solar", "SolarForCausalLM", "solar", LLAMA_WEIGHTS, LLAMA_KEYS, LLAMA_DEFAULTS,
           frozenset({"head_dim", "rope_scaling", "sliding_window", "skips"}), _solar_in, _solar_out,
           other_keys=SOLAR_KEYS),
    Format("exaone", "ExaoneForCausalLM", "exaone", EXAONE_WEIGHTS, EXAONE_KEYS, EXAONE_DEFAULTS,
           frozenset({"rope_scaling"}), act_key="activation_function"),
    Format("openelm", "OpenELMForCausalLM", "openelm", OPENELM_WEIGHTS,
           supports=frozenset({"head_dim", "per_layer", "qk_norm", "tied_only"}),
           config_in=_openelm_in, config_out=_openelm_out, other_keys=OPENELM_KEYS),
]}


# Sequence classifiers with one label (reward models, TRL's RewardTrainer): the causal format's body and
# config, no lm_head, a bias-free `score` head [1, dim] read at each sequence's last non-pad token
# (transformers' GenericForSequenceClassification). Keyed by the causal format; only families
# transformers has a *ForSequenceClassification class for.
def _one_label(hf: dict, fields: dict, extra_in=None):
    labels = hf.get("id2label") or {}
    if len(labels) != 1 and hf.get("num_labels") != 1:
        raise ConfigError(f"a reward model has one label (num_labels 1); config.json has {len(labels) or 2} "
                          "(id2label)")
    if extra_in:
        extra_in(hf, fields)


def _one_label_out(cfg: ModelConfig, out: dict, extra_out=None):
    if extra_out:
        extra_out(cfg, out)
    out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})


def _seq_cls(fmt: Format, architecture: str) -> Format:
    weights = {k: v for k, v in fmt.weights.items() if v != "lm_head.weight"} | {"score.weight": "score.weight"}
    return dataclasses.replace(fmt, architecture=architecture, weights=weights, head="score",
                               extra_in=partial(_one_label, extra_in=fmt.extra_in),
                               extra_out=partial(_one_label_out, extra_out=fmt.extra_out))


SEQ_CLS = {"llama": _seq_cls(FORMATS["llama"], "LlamaForSequenceClassification"),
           "mistral": _seq_cls(FORMATS["mistral"], "MistralForSequenceClassification")}
ARCHITECTURES = {f.architecture: f for f in [*FORMATS.values(), *SEQ_CLS.values()]}


def head_shapes(cfg: ModelConfig, fmt: Format) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor a checkpoint in `fmt` holds: cfg.shapes(), and for a
    sequence classifier no LM head but "score.weight" [1, dim]."""
    shapes = cfg.shapes()
    if fmt.head == "score":
        shapes.pop("lm_head.weight", None)
        shapes["score.weight"] = (1, cfg.dim)
    return shapes


def detect_format(hf: dict, path: str) -> Format:
    archs = hf.get("architectures") or []
    for arch in archs if isinstance(archs, list) else [archs]:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    for fmt in FORMATS.values():
        if hf.get("model_type") == fmt.model_type:
            return fmt
    raise ConfigError(f"{path}: unsupported architecture {archs or hf.get('model_type')!r}; "
                      f"supported: {', '.join(ARCHITECTURES)}")


def config_from_hf(hf: dict, path: str = "config.json") -> tuple[ModelConfig, Format]:
    """The ModelConfig of a config.json and its format; errors name `path` and the key as written."""
    fmt = detect_format(hf, path)
    if fmt.config_in is not None:
        fields = fmt.config_in(hf, path)
    else:
        fields = _keys_in(fmt, hf, path)
        if fmt.extra_in:
            fmt.extra_in(hf, fields)
    try:
        return ModelConfig(**fields, names={**fmt.names, **_rope_names(hf)}), fmt
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def refusal(cfg: ModelConfig, fmt: Format) -> str | None:
    """Why `fmt` cannot represent `cfg`, or None when it can."""
    s = fmt.supports
    needs = {
        "per_layer": (not cfg.uniform, "per-layer head counts or FFN widths"),
        "qk_norm": (cfg.qk_norm, "q/k RMSNorm"),
        "sliding_window": (cfg.sliding_window is not None, "a sliding attention window"),
        "skips": (cfg.has_skips or any(cfg.skip_save), "weighted layer skip connections"),
        "rope_scaling": (cfg.rope_scaling is not None, "RoPE scaling"),
        "head_dim": (cfg.head_dim * cfg.n_heads[0] != cfg.dim, f"head_dim {cfg.head_dim} != dim/heads"),
    }
    missing = [what for feature, (needed, what) in needs.items() if needed and feature not in s]
    if "tied_only" in s and not cfg.tie_embeddings:
        missing.append("untied input/output embeddings")
    if fmt.name == "solar" and len(cfg.skip_save) > 2:
        missing.append(f"{len(cfg.skip_save)} skip-connection slots (it has two)")
    return f"{fmt.architecture} cannot represent {', '.join(missing)}" if missing else None


def config_to_hf(cfg: ModelConfig, fmt: Format) -> dict:
    why = refusal(cfg, fmt)
    if why:
        raise ConfigError(why)
    if fmt.config_out is not None:
        return fmt.config_out(cfg)
    out = _keys_out(fmt, cfg)
    if fmt.extra_out:
        fmt.extra_out(cfg, out)
    return out


def default_format(cfg: ModelConfig) -> Format:
    """The plainest format that can represent cfg (Llama whenever possible)."""
    for name in ("llama", "mistral", "solar", "openelm", "exaone"):
        if refusal(cfg, FORMATS[name]) is None:
            return FORMATS[name]
    raise ConfigError("no supported checkpoint format can represent this model: "
                      + "; ".join(refusal(cfg, f) for f in FORMATS.values()))


def weight_plan(cfg: ModelConfig, fmt: Format) -> dict[str, tuple[str, ...]]:
    """Checkpoint tensor name -> the canonical names it holds (several when fused), for cfg."""
    shapes = head_shapes(cfg, fmt)
    plan = {}
    for theirs, ours in fmt.weights.items():
        ours = (ours,) if isinstance(ours, str) else ours
        for i in range(cfg.n_layers) if "{i}" in theirs else [None]:
            parts = tuple(o.format(i=i) for o in ours)
            if all(p in shapes for p in parts):
                plan[theirs.format(i=i)] = parts
    covered = {p for parts in plan.values() for p in parts}
    assert covered == set(shapes), f"format {fmt.name} does not cover {sorted(set(shapes) - covered)[:3]}"
    return plan
