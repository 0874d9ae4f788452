"""Hugging Face checkpoint directories in and out.

    read_checkpoint(path)  -> ModelConfig, Format, lazy canonical tensors (nothing loaded yet); a .gguf too
    load_model(path)       -> Transformer
    save_model(model, path, format=...)
    write_checkpoint(path, cfg, tensors, format=...)   streaming, one writer for everything
    convert(src, dst, to=...)                          streaming, never builds a model
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .formats import (FORMATS, IGNORED_SUFFIXES, Format, config_from_hf, config_to_hf, default_format, refusal,
                      weight_plan)
from .io import (LazyTensors, atomic_dir, copy_tokenizer_files, dtype_name, parse_dtype, read_json,
                 write_json, write_safetensors)

__all__ = ["read_config", "read_checkpoint", "load_model", "save_model", "write_checkpoint", "convert",
           "FORMATS", "refusal"]


def read_config(path: str | Path) -> tuple[ModelConfig, Format]:
    from .gguf import is_gguf, read_gguf_config
    if is_gguf(path):   # a GGUF file (llama.cpp, Ollama): checkpoint/gguf.py
        return read_gguf_config(path)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_path = path / "config.json"
    try:
        return config_from_hf(read_json(cfg_path, "every checkpoint needs one"), str(cfg_path))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, Format, dict[str, Callable[[], torch.Tensor]]]:
    """Config, format and canonical name -> loader of each tensor, after checking that every
    tensor the config needs is present with the right shape and nothing unexpected is."""
    from .gguf import is_gguf, read_gguf
    if is_gguf(path):   # dequantized on load: checkpoint/gguf.py
        return read_gguf(path)
    cfg, fmt = read_config(path)
    lazy = LazyTensors(path)
    shapes = cfg.shapes()
    plan = weight_plan(cfg, fmt)
    missing = [n for n in plan if n not in lazy]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    expected_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in lazy.keys() if n not in plan and n not in expected_extra
                  and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} for {fmt.architecture}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + "; biases and other extra weights are not supported")
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for theirs, ours in plan.items():
        want = (sum(shapes[p][0] for p in ours), *shapes[ours[0]][1:])
        if lazy.shape(theirs) != want:
            raise CheckpointError(f"{lazy.file_of[theirs]}: tensor {theirs} has shape {list(lazy.shape(theirs))}, "
                                  f"config.json implies {list(want)}")
        if len(ours) == 1:
            loaders[ours[0]] = lambda theirs=theirs: lazy.get(theirs)
        else:
            sizes = [shapes[p][0] for p in ours]
            for k, part in enumerate(ours):
                loaders[part] = lambda theirs=theirs, k=k, sizes=sizes: lazy.get(theirs).split(sizes)[k]
    return cfg, fmt, {name: _finite(loaders[name], name, path) for name in shapes}


def _finite(load, name, path):
    def checked():
        t = load()
        # one pass and no temporary: a NaN or inf anywhere makes the fp32 sum non-finite
        # (real weights never sum past 3e38, so there are no false alarms)
        if t.is_floating_point() and not bool(torch.sum(t, dtype=torch.float32).isfinite()):
            raise CheckpointError(f"{path}: tensor {name} contains NaN or inf values")
        return t
    return checked


def load_model(path: str | Path, dtype=None, device=None):
    """A Transformer with the weights of a Hugging Face checkpoint directory.

    dtype None keeps the checkpoint's dtype. Tensors are read one at a time straight into
    place, so peak memory is the model plus one tensor.
    """
    from ..model import Transformer, rope_inv_freq

    cfg, fmt, loaders = read_checkpoint(path)
    dtype = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, load in loaders.items():   # the embeddings come first and decide a dtype of None
        t = load()
        dtype = dtype or t.dtype
        state[name] = t.to(device=device, dtype=dtype)   # LazyTensors reads own their memory
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.source_dir, model.source_format = Path(path), fmt.name
    return model.eval()


def write_checkpoint(path: str | Path, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor | Callable],
                     format: str | Format | None = None, dtype=None, max_shard_size="5GB",
                     tokenizer_from: str | Path | None = None, overwrite: bool = False,
                     extra_files: Mapping[str, str] | None = None) -> Path:
    """Write cfg and canonical tensors (tensors or zero-argument loaders) as a Hugging Face
    directory in `format`, atomically. Returns the path."""
    fmt = _format(format) if format is not None else default_format(cfg)
    hf = config_to_hf(cfg, fmt)
    dtype = parse_dtype(dtype)
    plan = weight_plan(cfg, fmt)

    def load(theirs):
        parts = [tensors[p]() if callable(tensors[p]) else tensors[p] for p in plan[theirs]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    # the first tensor (the embeddings) decides a dtype of None; knowing every shape and dtype
    # up front lets the writer put each shard's header first and stream the bytes behind it
    names = list(plan)
    first = load(names[0])
    dtype = dtype or first.dtype
    hf["torch_dtype"] = dtype_name(dtype)
    shapes = cfg.shapes()
    specs = [(n, (sum(shapes[p][0] for p in plan[n]), *shapes[plan[n][0]][1:]), dtype) for n in names]

    def stream():
        for k, theirs in enumerate(names):
            t = first if k == 0 else load(theirs)
            yield theirs, t.detach().to(device="cpu", dtype=dtype)

    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(tmp, stream(), max_shard_size, specs=specs)
        write_json(tmp / "config.json", hf)
        copied = copy_tokenizer_files(tokenizer_from, tmp)
        if "generation_config.json" not in copied:
            write_json(tmp / "generation_config.json", {"bos_token_id": cfg.bos_token_id,
                                                        "eos_token_id": cfg.eos_token_id})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def save_model(model, path: str | Path, format: str | None = None, dtype=None, max_shard_size="5GB",
               tokenizer_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save a Transformer as a Hugging Face directory. `format` defaults to the format it was
    loaded from, else the plainest one that can represent it; tokenizer files are copied from
    `tokenizer_from`, by default the directory the model was loaded from."""
    format = format or getattr(model, "source_format", None)
    tokenizer_from = tokenizer_from or getattr(model, "source_dir", None)
    return write_checkpoint(path, model.config, model.state_dict(), format, dtype, max_shard_size,
                            tokenizer_from, overwrite)


def convert(src: str | Path, dst: str | Path, to: str, dtype=None, max_shard_size="5GB",
            overwrite: bool = False) -> Path:
    """Rewrite a checkpoint in another format, tensor by tensor (no model is built)."""
    cfg, _, loaders = read_checkpoint(src)
    fmt = _format(to)
    why = refusal(cfg, fmt)
    if why:
        raise ConfigError(f"cannot convert {src} to {fmt.name}: {why}")
    return write_checkpoint(dst, cfg, loaders, fmt, dtype, max_shard_size, tokenizer_from=src, overwrite=overwrite)


def _format(format) -> Format:
    if isinstance(format, Format):
        return format
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    return FORMATS[format]
