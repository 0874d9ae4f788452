"""Resume state: the output directory, the batch stream's position, and checkpoints.

    OUT/                         the final model (what the trainable exports; for the whole
                                 model a Hugging Face directory in the model's format)
    OUT/metrics.jsonl            one JSON object per logged step (metrics.py)
    OUT/checkpoints/step-N/      state/*.safetensors: every rank's shards of the weights (fp32) and
                                   AdamW moments, written by torch.distributed.checkpoint
                                   (checkpoint/sharded.py); a resume reshards them onto any number
                                   of processes. Trainables without sharded_state_dict() keep
                                   their (small) tensors whole in trainable.safetensors instead
                                 + config.json and tokenizer files when the weights are the whole
                                   model: the directory then loads (load_model, eval, serve) and
                                   exports (`lmfoundry export-checkpoint`) as a model
                                 + objective.safetensors (tensors of an objective's state, if any)
                                 + trainer_state.json (step, tokens, data position, schedule, RNG,
                                   optimizer groups, objective state, config, run settings, export)
    OUT/checkpoints/dpo_reference.safetensors   files an objective keeps across resumes

Each step directory is written under a temporary name (every rank writes its shards there) and
renamed into place after trainer_state.json, so a process killed mid-save (even kill -9) leaves
the last complete checkpoint as the newest a resume finds. Nothing is ever pickled.
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

from ..checkpoint import FORMATS, write_checkpoint
from ..checkpoint.formats import config_to_hf, default_format
from ..checkpoint.io import copy_tokenizer_files, dtype_name, write_json
from ..checkpoint.sharded import export_checkpoint, is_sharded, load_state, save_state
from ..errors import TrainError
from . import distributed as D

STATE_VERSION = 2
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
        """Every rank writes its shards into a staging directory; rank 0 adds the rest, then
        renames it into place and drops the oldest beyond keep_checkpoints."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        rank = D.rank_and_world()[0]
        final, staging = self.root / f"step-{step:08d}", self.root / f".step-{step:08d}.partial"
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        D.barrier()
        osd = get_optimizer_state_dict(self.model, self.optimizer)         # this rank's shards
        tensors, whole = {"optimizer": osd["state"]}, None
        sharded = self._sharded_weights()
        if sharded is not None:
            tensors["model"] = sharded
        else:
            whole = self.trainable.state_dict(self.model)                   # full tensors (collective)
        save_state(staging, tensors)
        if rank == 0:
            if whole is not None:
                save_file(split_tensors(whole)[0], str(staging / "trainable.safetensors"))
            elif set(self.model.config.shapes()) <= set(tensors["model"]):  # the whole model: loadable
                self._write_model_files(staging)
            self._write_state(staging, osd["param_groups"], step, tokens_seen)
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

    def _sharded_weights(self) -> dict | None:
        get = getattr(self.trainable, "sharded_state_dict", None)
        return get(self.model) if callable(get) else None

    def _write_model_files(self, staging: Path):
        cfg, fmt = self.model.config, self.export.get("format")
        hf = config_to_hf(cfg, FORMATS[fmt] if fmt else default_format(cfg))
        copy_tokenizer_files(self.export.get("tokenizer_from"), staging)
        write_json(staging / "config.json", dict(hf, torch_dtype="float32"))

    def _write_state(self, staging: Path, param_groups: list, step: int, tokens_seen: int):
        tensors, objective_state = split_tensors(self.committed["objective"])
        if tensors:
            save_file(tensors, str(staging / "objective.safetensors"))
        cfg, export = self.cfg, self.export
        state = {"version": STATE_VERSION, "step": step, "tokens_seen": tokens_seen, "objective": self.objective.name,
                 "world_size": D.rank_and_world()[1], "data": self.committed["data"],
                 "rng": rng_state(self.committed["rng"]), "optimizer": {"param_groups": param_groups},
                 "schedule": {"name": cfg.schedule, "lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps,
                              "min_lr_ratio": cfg.min_lr_ratio, "decay_frac": cfg.decay_frac},
                 "objective_state": objective_state, "config": dataclasses.asdict(cfg), "run": self.run_info or {},
                 "export": {"format": export.get("format"),
                            "dtype": export.get("dtype") and dtype_name(export["dtype"]),
                            "tokenizer_from": export.get("tokenizer_from") and str(export["tokenizer_from"])}}
        try:
            text = json.dumps(state, indent=1)
        except TypeError as e:
            raise TrainError(f"cannot save the training state as JSON ({e}); the data iterator's state_dict() "
                             "and the objective's state_dict() must be JSON-serializable apart from tensors") from None
        (staging / "trainer_state.json").write_text(text + "\n", encoding="utf-8")

    def load(self, path: Path) -> tuple[int, int]:
        """Restore weights, optimizer, data position, RNG and objective state; (step, tokens seen).
        The weights and moments are resharded onto this run's processes, however many; the data
        position is rank 0's, which holds for any number of processes sharing the same global batch."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if state.get("version") != STATE_VERSION:
            raise TrainError(f"{path}/trainer_state.json: version {state.get('version')!r}, expected {STATE_VERSION} "
                             "(written by another lmfoundry version)")
        rank, world = D.rank_and_world()
        if state["world_size"] != world and rank == 0 and self.cfg.progress:
            print(f"resuming {path.name}, saved by {state['world_size']} process(es), with {world}: the global batch "
                  "(processes x --batch-size x --grad-accum) must be the same as before", flush=True)
        tensors = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)["state"]}
        if (path / "trainable.safetensors").is_file():
            self.trainable.load_state_dict(self.model, load_file(str(path / "trainable.safetensors")))
        else:
            tensors["model"] = self._sharded_weights()                         # filled in place
        load_state(path, tensors)
        set_optimizer_state_dict(self.model, self.optimizer, {"state": tensors["optimizer"],
                                                              "param_groups": state["optimizer"]["param_groups"]})
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if callable(getattr(self.objective, "load_state_dict", None)):
            self.objective.load_state_dict({**state.get("objective_state", {}),
                                            **_read_tensors(path / "objective.safetensors")})
        self.last_saved = state["step"]
        self.commit()
        return state["step"], state["tokens_seen"]


def publish(out: Path, trainable, model, checkpoint: Path | None = None, **export):
    """The final model into OUT (which also holds metrics and checkpoints/): exported to a
    staging directory, then moved in file by file with os.replace, weights first and
    config.json last, stale weight files of an earlier final model removed. When `checkpoint`
    (the last step directory) holds the whole model, rank 0 streams the export from its shards
    tensor by tensor (no process gathers the model); otherwise the trainable exports itself."""
    staging = out / ".final.partial"
    if D.rank_and_world()[0] == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if checkpoint is not None and is_sharded(checkpoint):
        if D.rank_and_world()[0] == 0:
            export_checkpoint(checkpoint, staging, export.get("format"), export.get("dtype"), overwrite=True)
    else:
        trainable.export(model, staging, **export)            # collective; rank 0 writes
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
