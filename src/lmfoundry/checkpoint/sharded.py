"""Sharded training checkpoints: torch.distributed.checkpoint (DCP) in safetensors, read back on
any number of processes, and exported to a Hugging Face directory one tensor at a time.

    OUT/checkpoints/step-N/state/shard-0000R-model-00001-of-00001.safetensors
        what rank R holds: its shards of the weights ("model.<name>") and of the AdamW moments
        ("optimizer.<name>.exp_avg", ...), each file's header saying where its pieces sit in
        the full tensors (DCP's HuggingFaceStorageWriter format, save_distributed, written
        tensor by tensor by dcp_writer.StreamingStorageWriter). Safetensors only:
        DCP's default format keeps its metadata in a pickle, which lmfoundry never loads.
    OUT/checkpoints/step-N/config.json (+ tokenizer files)   the model's config, for export

    save_state(dir, tensors)     collective: every rank writes its own shards
    load_state(dir, tensors)     collective: fills `tensors` (any sharding) in place
    read_sharded(step_dir)       -> ModelConfig, Format, {name: loader} (one full tensor per call)
    export_checkpoint(step_dir, out, format=, dtype=)   the `lmfoundry export-checkpoint` verb

read_checkpoint (and so load_model, convert, eval, serve) accepts a step directory through
read_sharded, so a training checkpoint is usable as it is.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from functools import partial
from pathlib import Path

import torch

from ..errors import CheckpointError

STATE_DIR = "state"
MODEL_PREFIX = "model."


def is_sharded(path) -> bool:
    """A training step directory written by save_state (with its config.json)."""
    p = Path(path)
    return p.is_dir() and (p / STATE_DIR).is_dir() and (p / "config.json").is_file() \
        and any((p / STATE_DIR).glob("*.safetensors"))


def save_state(directory: Path, tensors: dict) -> None:
    """Write a nested dict of tensors (DTensor shards or plain tensors; plain ones are written once),
    one tensor in memory at a time (dcp_writer)."""
    import torch.distributed.checkpoint as dcp
    from .dcp_writer import storage_writer
    with _quiet():
        dcp.save(tensors, storage_writer=storage_writer(str(Path(directory) / STATE_DIR)), no_dist=_single())


def load_state(directory: Path, tensors: dict) -> None:
    """Fill a nested dict of tensors in place from save_state's files, resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    with _quiet():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(Path(directory) / STATE_DIR)), no_dist=_single())


def _single() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet():
    """DCP warns that it 'assumes a single process' even when told so (no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def stored_tensors(path) -> dict[str, tuple[list[int], torch.dtype]]:
    """Every full tensor in a step directory's state files: flat name ("model.embed.weight",
    "optimizer.embed.weight.exp_avg") -> (shape, dtype)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    meta = HuggingFaceStorageReader(str(Path(path) / STATE_DIR)).read_metadata()
    return {name: (list(m.size), m.properties.dtype) for name, m in meta.state_dict_metadata.items()}


def read_tensor(path, key: str, shape=None, dtype=None) -> torch.Tensor:
    """One full tensor of a step directory's state, assembled from every rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    path = Path(path)
    if shape is None:
        shape, dtype = stored_tensors(path)[key]
    box = {key: torch.empty(shape, dtype=dtype)}
    with _quiet():
        dcp.load(box, storage_reader=HuggingFaceStorageReader(str(path / STATE_DIR)), no_dist=True)
    return box[key]


def read_sharded(path) -> tuple:
    """(ModelConfig, Format, {canonical name: loader of the full tensor}) of a step directory
    that holds the whole model; each loader assembles one tensor from its shards."""
    from . import read_config
    path = Path(path)
    cfg, fmt = read_config(path)
    stored = stored_tensors(path)
    missing = [n for n in cfg.shapes() if MODEL_PREFIX + n not in stored]
    if missing:
        raise CheckpointError(f"{path}: a training checkpoint of part of the model (no {missing[0]}); only "
                              "checkpoints of the whole model can be read or exported as a model")
    for name, shape in cfg.shapes().items():
        if tuple(stored[MODEL_PREFIX + name][0]) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {stored[MODEL_PREFIX + name][0]}, config.json "
                                  f"implies {list(shape)}")
    return cfg, fmt, {n: partial(read_tensor, path, MODEL_PREFIX + n, *stored[MODEL_PREFIX + n]) for n in cfg.shapes()}


def export_checkpoint(step_dir, out, format: str | None = None, dtype=None, overwrite: bool = False,
                      progress: str | None = None) -> Path:
    """A Hugging Face directory from a training step directory, streamed tensor by tensor (no
    process holds more than one full tensor). format and dtype default to what the run would
    have exported (trainer_state.json), else the config's format and fp32."""
    from . import write_checkpoint
    step_dir = Path(step_dir)
    if not is_sharded(step_dir):
        raise CheckpointError(f"{step_dir}: not a training checkpoint (expected {step_dir}/config.json and "
                              f"{step_dir}/{STATE_DIR}/*.safetensors, as OUT/checkpoints/step-N)")
    cfg, fmt, loaders = read_sharded(step_dir)
    saved = {}
    if (step_dir / "trainer_state.json").is_file():
        saved = json.loads((step_dir / "trainer_state.json").read_text(encoding="utf-8")).get("export", {})
    return write_checkpoint(out, cfg, loaders, format=format or saved.get("format") or fmt,
                            dtype=dtype or saved.get("dtype"), tokenizer_from=step_dir, overwrite=overwrite,
                            progress=progress)


def add_parser(sub) -> None:
    """`lmfoundry export-checkpoint STEP_DIR OUT`."""
    p = sub.add_parser("export-checkpoint", help="a Hugging Face directory from a training checkpoint "
                       "(OUT/checkpoints/step-N), streamed tensor by tensor")
    p.add_argument("step_dir", help="a training checkpoint directory, e.g. runs/a/checkpoints/step-00001000")
    p.add_argument("out", help="the directory to write")
    p.add_argument("--format", default=None, help="llama, mistral, solar, exaone, openelm (default: the run's)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the run's export dtype)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(fn=_cmd_export)


def _cmd_export(args) -> None:
    import time
    t0 = time.perf_counter()
    out = export_checkpoint(args.step_dir, args.out, args.format, args.dtype, overwrite=args.force, progress="export")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
