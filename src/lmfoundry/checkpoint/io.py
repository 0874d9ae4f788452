"""Safetensors in and out: a validated lazy reader and a streaming, sharded, atomic writer.

Reading never unpickles: only `*.safetensors` (with or without `model.safetensors.index.json`)
is accepted. Headers are checked against file sizes up front, so a truncated shard is
reported by name before any tensor is read. Writing goes into a temporary directory beside
the destination, which is renamed into place only when everything was written.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json")
# safetensors' dtype names; the first four are what model weights may be stored as
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in ("auto", "none"):
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(path: Path, what: str = "") -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found{' (' + what + ')' if what else ''}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_header(file: Path) -> dict:
    """The safetensors JSON header, after checking the file holds every byte it promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{file}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: shard not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: corrupt safetensors header") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is not None and stop - start != math.prod(info["shape"]) * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name} has {stop - start} bytes for shape {info['shape']}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated: header promises {8 + n + end} bytes, file has {size}")
    header["__data_start__"] = 8 + n
    return header


class LazyTensors:
    """name -> tensor over the safetensors files of a checkpoint directory, read on demand."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index, single = self.dir / INDEX_NAME, self.dir / SINGLE_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files, weight_map = [SINGLE_NAME], None
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                pickled = [p.name for p in self.dir.glob("*.bin")] + [p.name for p in self.dir.glob("*.pt*")]
                hint = (f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to "
                        "safetensors with a tool you trust)") if pickled else ""
                raise CheckpointError(f"{self.dir}: no *.safetensors weights{hint}")
            weight_map = None
        self._data_start: dict[Path, int] = {}
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, dict] = {}
        for fname in files:
            header = _read_header(self.dir / fname)
            self._data_start[self.dir / fname] = header.pop("__data_start__")
            for name, info in header.items():
                if name != "__metadata__":
                    self.file_of[name], self.info[name] = self.dir / fname, info
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items() if self.file_of.get(n, Path()).name != f)
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]} is not in {weight_map[missing[0]]}"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def __contains__(self, name):
        return name in self.info

    def keys(self):
        return self.info.keys()

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """A tensor that owns its memory, read with plain file reads: a memory map would keep
        every page read resident (and alias the file), which streaming tools cannot afford."""
        file, info = self.file_of[name], self.info[name]
        if info["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        t = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
        if t.numel():
            with open(file, "rb") as f:
                f.seek(self._data_start[file] + info["data_offsets"][0])
                if f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != t.numel() * t.element_size():
                    raise CheckpointError(f"{file}: truncated while reading {name}")
        return t

    @property
    def dtype(self) -> torch.dtype:
        """The most common dtype on disk."""
        counts: dict[str, int] = {}
        for info in self.info.values():
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
        return ST_DTYPES.get(max(counts, key=counts.get), torch.float32)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t, in one pass and without a temporary in the usual case: a NaN or inf
    anywhere makes the sum non-finite, and only then (or for finite values summing past the
    dtype's range) is each element looked at."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def parse_size(size) -> int:
    """5_000_000_000, "5GB", "500MB", "2GiB" -> bytes (decimal units as Hugging Face uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"cannot read a size from {size!r} (examples: 5GB, 500MB, 1000000)")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `dest`; on success it replaces `dest` in one rename.

    On any exception the temporary directory is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest}: already exists and is not empty (choose another path or overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


def safetensors_header(entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The bytes that open a safetensors file holding `entries` (name, shape, dtype) in that order,
    and the number of data bytes that must follow: an 8-byte little-endian header length, then the
    JSON header (`__metadata__` {"format": "pt"} plus `metadata`'s string entries, dtype/shape/
    data_offsets per tensor) padded with spaces to a multiple of 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in ST_NAMES:
            raise CheckpointError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        if name in header:
            raise CheckpointError(f"tensor {name} written twice")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_tensor_bytes(f, t: torch.Tensor):
    """Append a tensor's raw (little-endian, row-major) bytes without another copy in memory."""
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size=5_000_000_000, *,
                      specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]):
    """Stream (name, tensor) pairs into shards of at most max_shard_size bytes, holding only the
    tensor in hand: `specs` (name, shape, dtype of every tensor, in the order `tensors` yields
    them) lets each shard's header be written first and each tensor's bytes be appended as it
    arrives. One shard is written as model.safetensors; several as
    model-0000k-of-0000n.safetensors with model.safetensors.index.json, as Hugging Face does.
    """
    limit = parse_size(max_shard_size)
    specs = [(n, tuple(s), d) for n, s, d in specs]
    shards, size = [], 0                          # greedy: a new shard when the next tensor would not fit
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if not shards or (shards[-1] and size + nbytes > limit):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    if not shards:
        shards.append([])
    it = iter(tensors)
    for k, shard in enumerate(shards):
        with open(directory / f"shard-{k:05d}.tmp", "wb") as f:
            f.write(safetensors_header(shard)[0])
            for name, shape, dtype in shard:
                got = next(it, None)
                if got is None:
                    raise CheckpointError(f"tensor {name} was promised but never produced")
                t = got[1].detach().to("cpu").contiguous()
                if got[0] != name or tuple(t.shape) != shape or t.dtype != dtype:
                    raise CheckpointError(f"expected tensor {name} {list(shape)} {dtype}, got {got[0]} "
                                          f"{list(t.shape)} {t.dtype}")
                write_tensor_bytes(f, t)
                del t, got
    extra = next(it, None)
    if extra is not None:
        raise CheckpointError(f"tensor {extra[0]} was not in the promised list")
    if len(shards) == 1:
        os.replace(directory / "shard-00000.tmp", directory / SINGLE_NAME)
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / f"shard-{k:05d}.tmp", directory / fname)
        weight_map.update({name: fname for name, _, _ in shard})
    total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs)
    with open(directory / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_tokenizer_files(src: str | Path | None, dst: Path) -> list[str]:
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def write_json(path: Path, data: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")

