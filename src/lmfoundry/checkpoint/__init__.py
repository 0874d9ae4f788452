"""Hugging Face checkpoint directories in and out.

    Checkpoint(path)       the directory opened for reading: .config, .format, .read(name) per tensor
    read_checkpoint(path)  -> ModelConfig, Format, lazy canonical tensors (nothing loaded yet); a .gguf too
    load_model(path)       -> Transformer
    ...(path, adapter=DIR) the same with a PEFT LoRA adapter folded into each tensor as it is read
    save_model(model, path, format=..., tokenizer_from=...)
    write_checkpoint(path, cfg, tensors, format=...)   streaming, one writer for everything
    convert(src, dst, to=...)                          streaming, never builds a model

Reading and writing go through one reader (Checkpoint) and one writer (write_checkpoint): loading
a model, converting, up-scaling and merging all use them.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .formats import (FORMATS, IGNORED_SUFFIXES, Format, config_from_hf, config_to_hf, default_format, head_shapes,
                      refusal, weight_plan)
from .io import (WEIGHT_DTYPES, LazyTensors, all_finite, atomic_dir, copy_tokenizer_files, dtype_name, parse_dtype,
                 read_json, write_json, write_safetensors)

__all__ = ["Checkpoint", "read_config", "read_checkpoint", "load_model", "save_model", "write_checkpoint",
           "convert", "FORMATS", "refusal"]


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


class Checkpoint:
    """A checkpoint directory opened for reading: its config and format (from config.json) and its
    canonical tensors (ModelConfig.shapes() names), each read on demand with plain file reads.

    Opening reads only config.json and the safetensors headers, and checks that every tensor the
    config needs is there with the right shape and that nothing unexpected is. Each read checks
    the stored dtype, splits a fused tensor (OpenELM's qkv_proj) into its own copy of the part
    and refuses NaN or inf. With `adapter` (a PEFT LoRA adapter directory, checked against this
    config and format on opening), each tensor is read with the adapter folded in (lora.Adapter).
    """

    def __init__(self, path: str | Path, adapter: str | Path | None = None):
        self.path = Path(path)
        self.config, self.format = read_config(path)
        self.files = LazyTensors(path)
        self.shapes = head_shapes(self.config, self.format)
        plan = weight_plan(self.config, self.format)
        self._check_names(plan)
        self.stored: dict[str, tuple[str, int, list[int]]] = {}   # ours -> (stored name, part, part sizes)
        for theirs, ours in plan.items():
            sizes = [self.shapes[p][0] for p in ours]
            want = (sum(sizes), *self.shapes[ours[0]][1:])
            if self.files.shape(theirs) != want:
                raise CheckpointError(f"{self.files.file_of[theirs]}: tensor {theirs} has shape "
                                      f"{list(self.files.shape(theirs))}, config.json implies {list(want)}")
            for k, part in enumerate(ours):
                self.stored[part] = (theirs, k, sizes)
        self.adapter = _adapter(adapter, self.config, self.format)

    def _check_names(self, plan: dict):
        missing = [n for n in plan if n not in self.files]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]}" + _more(missing))
        expected_extra = {"lm_head.weight"} if self.config.tie_embeddings else set()
        unexpected = [n for n in self.files.keys() if n not in plan and n not in expected_extra
                      and not n.endswith(IGNORED_SUFFIXES)]
        if unexpected:
            raise CheckpointError(f"{self.path}: unexpected tensor {unexpected[0]} for {self.format.architecture}"
                                  + _more(unexpected) + "; biases and other extra weights are not supported")

    def stored_name(self, name: str) -> str:
        """The checkpoint's own name of the tensor holding canonical `name` (its filters and errors use it)."""
        return self.stored[name][0]

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape on disk of the tensor holding `name` (the whole fused tensor where it is fused)."""
        return self.files.shape(self.stored_name(name))

    @property
    def dtype(self) -> torch.dtype:
        """The most common dtype on disk."""
        return self.files.dtype

    def read(self, name: str) -> torch.Tensor:
        """Canonical tensor `name`, in its stored dtype, owning its memory."""
        theirs, part, sizes = self.stored[name]
        file, stored_dtype = self.files.file_of[theirs], self.files.info[theirs]["dtype"]
        if stored_dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{file}: tensor {theirs} has dtype {stored_dtype}; weights must be float32, "
                                  "bfloat16, float16 or float64")
        t = self.files.get(theirs)
        if len(sizes) > 1:
            t = t.split(sizes)[part].clone()       # a copy, so the fused tensor is freed
        if not all_finite(t):
            raise CheckpointError(f"{file}: tensor {theirs} read as {name} contains NaN or inf values")
        return t if self.adapter is None else self.adapter.fold(name, t)

    def loaders(self) -> dict[str, Callable[[], torch.Tensor]]:
        """Canonical name -> a zero-argument reader of it, in ModelConfig.shapes() order."""
        return {name: partial(self.read, name) for name in self.shapes}


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _adapter(path, config, fmt):
    if path is None:
        return None
    from ..lora import Adapter
    return Adapter(path, config, fmt)


def read_checkpoint(path: str | Path, adapter: str | Path | None = None
                    ) -> tuple[ModelConfig, Format, dict[str, Callable[[], torch.Tensor]]]:
    """Config, format and canonical name -> loader of each tensor (see Checkpoint); a GGUF file
    is dequantized on load (checkpoint/gguf.py); a training checkpoint (OUT/checkpoints/step-N)
    is assembled from its shards (checkpoint/sharded.py). `adapter`: fold a PEFT LoRA adapter in."""
    from .gguf import is_gguf, read_gguf
    from .sharded import is_sharded, read_sharded
    if is_gguf(path):
        config, fmt, loaders = read_gguf(path)
    elif is_sharded(path):
        config, fmt, loaders = read_sharded(path)
    else:
        ckpt = Checkpoint(path, adapter)
        return ckpt.config, ckpt.format, ckpt.loaders()
    lora = _adapter(adapter, config, fmt)
    if lora is not None:
        loaders = {name: (lambda name=name, read=read: lora.fold(name, read())) for name, read in loaders.items()}
    return config, fmt, loaders


def load_model(path: str | Path, dtype=None, device=None, adapter: str | Path | None = None):
    """A Transformer with the weights of a Hugging Face checkpoint directory (with a PEFT LoRA
    adapter folded in: `adapter`).

    dtype None keeps the checkpoint's dtype. Tensors are read one at a time straight into
    place, so peak memory is the model plus one tensor.
    """
    from ..model import Transformer, rope_inv_freq

    config, fmt, loaders = read_checkpoint(path, adapter)
    if fmt.head != "lm":
        raise CheckpointError(f"{path}: a {fmt.architecture} (a reward model) has no language-model head; load it with "
                              "lmfoundry.train.reward.load_reward_model")
    dtype = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    for name, read in loaders.items():   # the embeddings come first and decide a dtype of None
        t = read()
        dtype = dtype or t.dtype
        state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def write_checkpoint(path: str | Path, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor | Callable],
                     format: str | Format | None = None, dtype=None, max_shard_size="5GB",
                     tokenizer_from: str | Path | None = None, overwrite: bool = False,
                     extra_files: Mapping[str, str] | None = None, progress: str | None = None) -> Path:
    """Write cfg and its canonical tensors (tensors or zero-argument loaders, called one at a
    time) as a Hugging Face directory in `format` (default: the plainest that can represent cfg).

    Everything goes into a temporary directory renamed into place at the end: the safetensors
    shards (each header first, the tensors streamed behind it), config.json, the tokenizer files
    of `tokenizer_from`, generation_config.json (unless copied) and `extra_files` (name -> text).
    An existing non-empty `path` is refused before any tensor is loaded, unless overwrite.
    `progress` labels a progress bar on stderr. Returns the path.
    """
    fmt = _format(format) if format is not None else default_format(cfg)
    hf, dtype = config_to_hf(cfg, fmt), parse_dtype(dtype)
    plan, shapes = weight_plan(cfg, fmt), head_shapes(cfg, fmt)
    names = list(plan)

    def load(theirs):
        parts = [tensors[p]() if callable(tensors[p]) else tensors[p] for p in plan[theirs]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    with atomic_dir(path, overwrite=overwrite) as tmp:
        # the first tensor (the embeddings) decides a dtype of None; knowing every shape and dtype
        # up front lets the writer put each shard's header first and stream the bytes behind it
        loaded = [load(names[0])]
        dtype = dtype or loaded[0].dtype
        specs = [(n, (sum(shapes[p][0] for p in plan[n]), *shapes[plan[n][0]][1:]), dtype) for n in names]
        bar = tqdm(total=sum(torch.Size(s).numel() for _, s, _ in specs) * dtype.itemsize, unit="B",
                   unit_scale=True, desc=progress, disable=progress is None, leave=False)

        def stream():
            for theirs in names:
                t = (loaded.pop() if loaded else load(theirs)).detach().to(device="cpu", dtype=dtype)
                yield theirs, t
                bar.update(t.numel() * dtype.itemsize)

        with bar:
            write_safetensors(tmp, stream(), max_shard_size, specs=specs)
        write_json(tmp / "config.json", dict(hf, torch_dtype=dtype_name(dtype)))
        if "generation_config.json" not in copy_tokenizer_files(tokenizer_from, tmp):
            write_json(tmp / "generation_config.json", {"bos_token_id": cfg.bos_token_id,
                                                        "eos_token_id": cfg.eos_token_id})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def save_model(model, path: str | Path, format: str | Format | None = None, dtype=None, max_shard_size="5GB",
               tokenizer_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save a Transformer as a Hugging Face directory in `format` (default: the plainest one that
    can represent its config), with the tokenizer files of `tokenizer_from` (default: none)."""
    return write_checkpoint(path, model.config, model.state_dict(), format, dtype, max_shard_size,
                            tokenizer_from, overwrite)


def convert(src: str | Path, dst: str | Path, to: str, dtype=None, max_shard_size="5GB",
            overwrite: bool = False) -> Path:
    """Rewrite a checkpoint in another format, tensor by tensor (no model is built)."""
    ckpt = Checkpoint(src)
    fmt = _format(to)
    why = refusal(ckpt.config, fmt)
    if why:
        raise ConfigError(f"cannot convert {src} to {fmt.name}: {why}")
    return write_checkpoint(dst, ckpt.config, ckpt.loaders(), fmt, dtype, max_shard_size, tokenizer_from=src,
                            overwrite=overwrite)


def _format(format) -> Format:
    if isinstance(format, Format):
        return format
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    return FORMATS[format]
