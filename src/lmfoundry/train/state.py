"""Resume state: the output directory, the batch stream's position, and checkpoints.

    OUT/                         the final model (what the trainable exports; for the whole
                                 model a Hugging Face directory in the model's format)
    OUT/metrics.jsonl            one JSON object per logged step (metrics.py)
    OUT/checkpoints/step-N/      the trained weights (a Hugging Face directory in fp32 when they
                                 are the whole model, else trainable.safetensors)
                                 + optimizer.safetensors (AdamW moments)
                                 + objective.safetensors (tensors of an objective's state, if any)
                                 + trainer_state.json (step, tokens, data position, schedule, RNG,
                                   optimizer scalars, objective state, config, run settings)
    OUT/checkpoints/dpo_reference.safetensors   files an objective keeps across resumes

Each step directory is written under a temporary name and renamed into place, so a complete
one is all that a resume ever finds. Nothing is ever pickled.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import read_checkpoint, write_checkpoint
from ..errors import TrainError
from . import distributed as D

STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------- batch streams

class ListBatches:
    """Batches held in memory, cycled forever, with an exact-resume position (tests, small data)."""

    def __init__(self, batches: list[dict]):
        if not batches:
            raise TrainError("ListBatches needs at least one batch")
        self.batches, self.index = list(batches), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.batches[self.index % len(self.batches)]
        self.index += 1
        return b

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict):
        self.index = int(state["index"])


class Stream:
    """The loop's view of a batch iterable: counts what it consumed, saves and restores the
    position (through the iterable's own state_dict when it has one, else by replaying), and can
    look ahead (for an objective's prepare) without losing anything."""

    def __init__(self, batches):
        self.src = batches
        self.stateful = callable(getattr(batches, "state_dict", None)) and callable(
            getattr(batches, "load_state_dict", None))
        self.it = iter(batches)
        self.consumed = 0
        self.buffer: list = []

    def __next__(self):
        b = self.buffer.pop(0) if self.buffer else next(self.it)
        self.consumed += 1
        return b

    def take(self, n: int) -> list | None:
        """The next n batches, or None when the data runs out first."""
        try:
            return [next(self) for _ in range(n)]
        except StopIteration:
            return None

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "state": copy.deepcopy(self.src.state_dict()) if self.stateful else None}

    def load_state_dict(self, state: dict):
        if self.stateful and state.get("state") is not None:
            self.src.load_state_dict(copy.deepcopy(state["state"]))
            self.it = iter(self.src)
        else:                                   # a plain iterable: replay it up to the saved position
            for _ in range(state["consumed"]):
                next(self.it)
        self.consumed = state["consumed"]

    def peek(self, n: int) -> list:
        """Up to the next n batches; they are still yielded afterwards."""
        if self.stateful and not self.buffer:
            saved = copy.deepcopy(self.src.state_dict())
            out = []
            for _ in range(n):
                try:
                    out.append(next(self.it))
                except StopIteration:
                    break
            self.src.load_state_dict(saved)
            self.it = iter(self.src)
            return out
        while len(self.buffer) < n:
            try:
                self.buffer.append(next(self.it))
            except StopIteration:
                break
        return list(self.buffer[:n])


# ---------------------------------------------------------------- output directory

@dataclass
class RunDir:
    """An output directory checked for this run, and the checkpoint to resume from (or None)."""
    path: Path
    resume_from: Path | None = None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete OUT/checkpoints/step-N directory, or None."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def prepare_out_dir(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> RunDir:
    """Join the process group torchrun describes, then check (and with `overwrite`, empty) the
    output directory before any work is done; every rank calls it, only rank 0 deletes. Once
    per run: the CLI calls it before tokenizing data and hands the RunDir to train()."""
    D.init_distributed()
    out = Path(out_dir)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise TrainError(f"{out}: no checkpoint to resume from (expected {out}/checkpoints/step-N/"
                             "trainer_state.json)")
        return RunDir(out, ckpt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise TrainError(f"{out}: already exists and is not empty (use --resume to continue the run in it, "
                             "--overwrite to replace it, or choose another --out)")
        if D.rank_and_world()[0] == 0:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    D.barrier()
    return RunDir(out)


# ---------------------------------------------------------------- tensors + JSON, RNG

def split_tensors(flat: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """{name: tensor or JSON value} -> (tensors for safetensors, the rest for JSON)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}


def optimizer_flat(osd: dict) -> dict:
    """A torch optimizer state dict's per-parameter state as {"param/key": value}."""
    return {f"{name}/{key}": value for name, st in osd["state"].items() for key, value in st.items()}


def optimizer_state(flat: dict, param_groups: list) -> dict:
    state: dict[str, dict] = {}
    for full, value in flat.items():
        name, key = full.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": param_groups}


def _b64(t: torch.Tensor | np.ndarray) -> str:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).copy()


def capture_rng() -> tuple:
    """Every generator a run might draw from, as they are now (cheap; encoded by rng_state)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def rng_state(captured: tuple | None = None) -> dict:
    """The generators (captured earlier, or now) as compact base64 (rank 0's; ranks share a seed)."""
    torch_state, (version, mt, gauss), (kind, keys, pos, has_gauss, cached), cuda = captured or capture_rng()
    state = {"torch": _b64(torch_state), "python": [version, _b64(np.array(mt, dtype=np.uint32)), gauss],
             "numpy": [kind, _b64(keys), pos, has_gauss, cached]}
    if cuda is not None:
        state["cuda"] = [_b64(s) for s in cuda]
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8)))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in _unb64(mt, np.uint32)), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, _unb64(keys, np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(_unb64(s, np.uint8)) for s in state["cuda"]])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.is_file() else {}


# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoints:
    """OUT/checkpoints/step-N: everything a resume needs, saved and loaded (collective calls
    under torchrun: every rank calls save and load).

    The data position, the RNG and the objective's state are taken at `commit()`, after each
    completed step, so a checkpoint saved by Ctrl-C in the middle of a step holds the state
    of the last complete one (the weights and moments have not moved since)."""
    root: Path                 # OUT/checkpoints
    model: torch.nn.Module
    trainable: object
    optimizer: torch.optim.Optimizer
    objective: object
    stream: Stream
    cfg: object                # TrainConfig
    export: dict               # format and tokenizer_from of the step directories
    run_info: dict
    last_saved: int | None = None

    def __post_init__(self):
        self.commit()

    def commit(self):
        state = self.objective.state_dict() if callable(getattr(self.objective, "state_dict", None)) else {}
        self.committed = {"data": self.stream.state_dict(), "rng": capture_rng(), "objective": state}

    def save(self, step: int, tokens_seen: int) -> Path:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        weights = self.trainable.state_dict(self.model)                   # collective under FSDP
        osd = get_optimizer_state_dict(self.model, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        final = self.root / f"step-{step:08d}"
        if D.rank_and_world()[0] == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".step-{step:08d}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            self._write(staging, weights, osd, step, tokens_seen)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            if self.cfg.keep_checkpoints:
                done = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))
                for _, old in done[:-self.cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        self.last_saved = step
        return final

    def _write(self, staging: Path, weights: dict, osd: dict, step: int, tokens_seen: int):
        if set(self.model.config.shapes()) <= set(weights):          # the whole model: a loadable checkpoint
            write_checkpoint(staging, self.model.config, weights, tokenizer_from=self.export.get("tokenizer_from"),
                             format=self.export.get("format"), overwrite=True)
        else:
            staging.mkdir(parents=True)
            save_file(split_tensors(weights)[0], str(staging / "trainable.safetensors"))
        opt_tensors, opt_scalars = split_tensors(optimizer_flat(osd))
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        tensors, objective_state = split_tensors(self.committed["objective"])
        if tensors:
            save_file(tensors, str(staging / "objective.safetensors"))
        cfg = self.cfg
        state = {"version": STATE_VERSION, "step": step, "tokens_seen": tokens_seen, "objective": self.objective.name,
                 "world_size": D.rank_and_world()[1], "data": self.committed["data"],
                 "rng": rng_state(self.committed["rng"]),
                 "optimizer": {"param_groups": osd["param_groups"], "scalars": opt_scalars},
                 "schedule": {"name": cfg.schedule, "lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps,
                              "min_lr_ratio": cfg.min_lr_ratio, "decay_frac": cfg.decay_frac},
                 "objective_state": objective_state, "config": dataclasses.asdict(cfg), "run": self.run_info or {}}
        try:
            text = json.dumps(state, indent=1)
        except TypeError as e:
            raise TrainError(f"cannot save the training state as JSON ({e}); the data iterator's state_dict() "
                             "and the objective's state_dict() must be JSON-serializable apart from tensors") from None
        (staging / "trainer_state.json").write_text(text + "\n", encoding="utf-8")

    def load(self, path: Path) -> tuple[int, int]:
        """Restore weights, optimizer, data position, RNG and objective state; (step, tokens seen)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if state.get("version") != STATE_VERSION:
            raise TrainError(f"{path}/trainer_state.json: version {state.get('version')!r}, expected {STATE_VERSION}")
        world = D.rank_and_world()[1]
        if state["world_size"] != world:
            raise TrainError(f"{path}: saved by {state['world_size']} process(es), resumed with {world}; the data "
                             "position is per global batch, so resume with the same number of processes")
        if (path / "trainable.safetensors").is_file():
            weights = load_file(str(path / "trainable.safetensors"))
        else:
            cfg, _, loaders = read_checkpoint(path)
            if cfg.shapes() != self.model.config.shapes():
                raise TrainError(f"{path}: the checkpoint's model shape differs from the model being trained")
            weights = {name: load() for name, load in loaders.items()}
        self.trainable.load_state_dict(self.model, weights)
        osd = optimizer_state({**_read_tensors(path / "optimizer.safetensors"), **state["optimizer"]["scalars"]},
                              state["optimizer"]["param_groups"])
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if callable(getattr(self.objective, "load_state_dict", None)):
            self.objective.load_state_dict({**state.get("objective_state", {}),
                                            **_read_tensors(path / "objective.safetensors")})
        self.last_saved = state["step"]
        self.commit()
        return state["step"], state["tokens_seen"]


def publish(out: Path, trainable, model, **export):
    """The final model into OUT (which also holds metrics and checkpoints/): exported to a
    staging directory, then moved in file by file with os.replace, weights first and
    config.json last, stale weight files of an earlier final model removed."""
    staging = out / ".final.partial"
    if D.rank_and_world()[0] == 0:
        shutil.rmtree(staging, ignore_errors=True)
    trainable.export(model, staging, **export)                # collective; rank 0 writes
    if D.rank_and_world()[0] == 0:
        names = sorted(p.name for p in staging.iterdir())
        for old in out.iterdir():
            if old.is_file() and old.name not in names and (old.suffix == ".safetensors"
                                                            or old.name == "model.safetensors.index.json"):
                old.unlink()
        for name in sorted(names, key=lambda n: n == "config.json"):
            os.replace(staging / name, out / name)
        shutil.rmtree(staging, ignore_errors=True)
    D.barrier()
