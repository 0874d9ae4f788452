"""The training loop: one loop for every objective (next-token, SFT, DPO).

    train(model, batches, objective, TrainConfig(...), out_dir) -> TrainResult

Each optimizer step draws `grad_accum` micro-batches, divides each micro-batch's summed loss by
the count of loss units over the whole step and all ranks (so accumulation and data parallelism
equal one large batch), clips, and steps AdamW at the scheduled learning rate. On CPU the
model trains in fp32; on GPU in fp32 master weights with bf16 autocast (or FSDP2's bf16
parameter gathering).

Output directory:
    OUT/                         the final model: a normal Hugging Face checkpoint directory
                                 (config.json, safetensors in the model's format, tokenizer files
                                 copied from the source, generation_config.json)
    OUT/metrics.jsonl            one JSON object per logged step
    OUT/checkpoints/step-N/      HF weights (fp32) + trainer_state.json (step, data position,
                                 schedule, RNG, config) + optimizer.safetensors (AdamW moments)
    OUT/checkpoints/dpo_reference.safetensors   DPO reference log-probs (computed once)
    OUT/tensorboard/             with tensorboard=True
Each step directory is written under a temporary name and renamed into place, so a complete
one is all that `resume` ever finds. Nothing is ever pickled.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import FORMATS, read_checkpoint, refusal, write_checkpoint
from ..checkpoint.io import parse_dtype
from ..errors import TrainError
from . import distributed as D
from .objectives import DPO
from .schedule import SCHEDULES, lr_factor

STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainConfig:
    steps: int = 100                      # optimizer steps
    lr: float = 3e-4                      # peak learning rate
    warmup: int = 0                       # linear warmup steps
    schedule: str = "cosine"              # cosine | wsd | wsd-sqrt | constant
    min_lr_ratio: float = 0.1             # final lr = min_lr_ratio * lr (cosine, wsd)
    decay_frac: float = 0.2               # wsd: share of the steps spent decaying
    weight_decay: float = 0.1             # AdamW, on matrices only (not on norms)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_accum: int = 1                   # micro-batches per optimizer step
    clip: float = 1.0                     # max gradient norm; 0 = no clipping
    log_every: int = 1
    eval_every: int = 0                   # held-out loss every N steps (0 = never; also at the end)
    eval_batches: int = 8                 # batches of held-out data per evaluation
    save_every: int = 0                   # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 3             # newest step directories kept (0 = all)
    seed: int = 0
    device: str = "auto"                  # auto (cuda if present) | cpu | cuda | cuda:1 ...
    dtype: str = "auto"                   # autocast dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    save_dtype: str | None = None         # final weights' dtype (None: the dtype the model came in)
    compile: bool = False                 # torch.compile each block
    activation_checkpointing: bool = False
    fsdp: bool = False                    # FSDP2 (fully_shard) instead of DDP under torchrun
    progress: bool = True                 # tqdm bar on rank 0
    tensorboard: bool = False

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        positive = ("steps", "grad_accum", "log_every", "eval_batches")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise TrainError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every", "save_every", "keep_checkpoints", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise TrainError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainError("lr must be > 0, weight_decay and clip >= 0, min_lr_ratio in [0, 1]")
        if not 0 <= self.decay_frac <= 1 or len(self.betas) != 2:
            raise TrainError("decay_frac must be in [0, 1] and betas a pair")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise TrainError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"{where}: unknown training setting(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TrainResult:
    out_dir: Path
    step: int                         # optimizer steps completed in total
    losses: list[float]               # the loss of every step this call ran
    resumed_from: int | None          # the step a resume started at
    stopped_early: str | None = None  # why training ended before cfg.steps (data ran out)


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


class _Stream:
    """The loop's view of a batch iterable: counts what it consumed, saves and restores the
    position (through the iterable's own state_dict when it has one, else by replaying), and can
    look ahead (for DPO's reference pass) without losing anything."""

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

def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete OUT/checkpoints/step-N directory, or None."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def prepare_out_dir(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path | None:
    """Check (and with `overwrite`, empty) the output directory before any work is done.
    Returns the checkpoint to resume from (None for a fresh run). Call it on every rank before
    any rank writes; only rank 0 deletes."""
    out = Path(out_dir)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise TrainError(f"{out}: no checkpoint to resume from (expected {out}/checkpoints/step-N/"
                             "trainer_state.json)")
        return ckpt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise TrainError(f"{out}: already exists and is not empty (use --resume to continue the run in it, "
                             "--overwrite to replace it, or choose another --out)")
        if D.rank_and_world()[0] == 0:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    return None


# ---------------------------------------------------------------- checkpoints

def _optimizer_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for full, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, key = full.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _b64(t: torch.Tensor | np.ndarray) -> str:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).copy()


def _rng_state() -> dict:
    """Every generator a run might draw from, as compact base64 (rank 0's; ranks share a seed)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, _b64(np.array(mt, dtype=np.uint32)), gauss],
             "numpy": [kind, _b64(keys), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8)))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in _unb64(mt, np.uint32)), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, _unb64(keys, np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(_unb64(s, np.uint8)) for s in state["cuda"]])


def _publish(staging: Path, out: Path):
    """Move a complete checkpoint written in `staging` into `out`, which also holds metrics and
    checkpoints/: file by file with os.replace, weights first and config.json last, and stale
    weight files of an earlier final checkpoint removed."""
    names = sorted(p.name for p in staging.iterdir())
    for old in out.iterdir():
        if old.is_file() and old.name not in names and (old.suffix == ".safetensors"
                                                        or old.name == "model.safetensors.index.json"):
            old.unlink()
    for name in sorted(names, key=lambda n: n == "config.json"):
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- the loop

def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(model, batches, objective, cfg: TrainConfig, out_dir, *, eval_batches=None, resume: bool = False,
          overwrite: bool = False, tokenizer_from=None, format: str | None = None,
          run_info: dict | None = None) -> TrainResult:
    """Train `model` on `batches` (an iterable of batch dicts for this rank; one with
    state_dict()/load_state_dict() resumes without replaying) with `objective`, writing
    checkpoints, metrics and the final model to `out_dir`.

    resume: continue from the newest OUT/checkpoints/step-N (model, AdamW moments, step and so
    the learning rate, data position, RNG, DPO reference log-probs); `model` may be freshly
    built, its weights are replaced. overwrite: replace an existing OUT. tokenizer_from: where
    the tokenizer files of the output come from (default: the directory the model was loaded
    from). format: the output checkpoint format (default: the model's source format).
    run_info: extra JSON recorded in every trainer_state.json (e.g. the command line settings).
    Runs data-parallel when a process group exists (or torchrun's environment says so).
    """
    D.init_distributed()
    rank, world = D.rank_and_world()
    out = Path(out_dir)
    start_ckpt = prepare_out_dir(out, resume, overwrite)
    D.barrier()

    # where and in what precision
    device = D.default_device() if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = D.default_device()
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "float32": None, "fp32": None,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[cfg.dtype]
    source_dir = getattr(model, "source_dir", None)
    fmt = format or getattr(model, "source_format", None)
    tokenizer_from = tokenizer_from or source_dir
    final_dtype = parse_dtype(cfg.save_dtype) or model.dtype
    if fmt is not None:                     # refuse now, not after hours of training
        if fmt not in FORMATS:
            raise TrainError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
        why = refusal(model.config, FORMATS[fmt])
        if why:
            raise TrainError(f"the {fmt} format cannot hold this model: {why}")
    model_config = model.config
    model.to(device=device, dtype=torch.float32).train()      # fp32 master weights
    torch.manual_seed(cfg.seed)
    net = D.parallelize(model, fsdp=cfg.fsdp, compile=cfg.compile,
                        activation_checkpointing=cfg.activation_checkpointing,
                        param_dtype=amp if (cfg.fsdp and device.type == "cuda") else None, device=device)
    use_autocast = amp is not None and not (cfg.fsdp and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if use_autocast else nullcontext
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    stream = _Stream(batches)
    ckpt_root = out / "checkpoints"
    step, tokens_seen, resumed_from = 0, 0, None
    if start_ckpt is not None:
        state = json.loads((start_ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        step, tokens_seen = _load_checkpoint(start_ckpt, state, model, optimizer, stream, world)
        resumed_from = step
    data_state = stream.state_dict()

    # DPO: reference log-probs of every pair this run will see, from the initial policy, once
    eval_list = None
    if eval_batches is not None:
        eval_list = []
        for b in eval_batches:
            if len(eval_list) == cfg.eval_batches:
                break
            eval_list.append(b)
    if isinstance(objective, DPO):
        _prepare_reference(objective, net, model, stream, eval_list, cfg, autocast, ckpt_root, step, start_ckpt)

    # logging
    log = _Metrics(out, rank, resumed_from, cfg.tensorboard)
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc=objective.name, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    last_saved = step if start_ckpt is not None else None
    losses: list[float] = []
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "stats": {}}
    stopped = None

    def save(at_step):
        nonlocal last_saved
        path = _save_checkpoint(ckpt_root, at_step, model, model_config, optimizer, fmt, tokenizer_from, cfg,
                                data_state, tokens_seen, objective, world, run_info)
        last_saved = at_step
        return path

    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            try:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
            except StopIteration:
                stopped = f"the data ran out after {step} steps"
                break
            lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            count = D.all_reduce_sum(torch.stack([torch.as_tensor(objective.count(b)) for b in micro]).sum()
                                     .to(device=device, dtype=torch.float64)).clamp(min=1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            stats: dict[str, torch.Tensor] = {}
            step_tokens = 0
            for k, batch in enumerate(micro):
                step_tokens += objective.tokens(batch) * world
                batch = _to_device(batch, device)
                with D.grad_sync(net, k == len(micro) - 1):
                    with autocast():
                        part, part_stats = objective(net, batch)
                    (part * (world / count)).backward()
                loss_sum += part.detach()
                for name, v in part_stats.items():
                    stats[name] = stats.get(name, 0) + v.detach().double()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            reduced = D.all_reduce_sum(torch.stack([loss_sum, *[stats[n] for n in sorted(stats)]]))
            loss = float(reduced[0] / count)
            grad_norm = float(grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise _nan_error(step + 1, loss, grad_norm, last_saved, ckpt_root)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            data_state = stream.state_dict()
            losses.append(loss)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            window["time"] += time.perf_counter() - t0
            window["loss"] += loss
            window["steps"] += 1
            window["tokens"] += step_tokens
            for name, v in zip(sorted(stats), reduced[1:]):
                window["stats"][name] = window["stats"].get(name, 0.0) + float(v / count)
            bar.update(1)

            do_eval = eval_list is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or do_eval:
                row = {"step": step, "loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                       "tokens": tokens_seen, "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
                       **{n: v / window["steps"] for n, v in window["stats"].items()}}
                if do_eval:
                    row.update(_evaluate(net, objective, eval_list, device, autocast))
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "stats": {}}
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        if world == 1 and step > 0 and last_saved != step:
            path = save(step)
            print(f"\ninterrupted: saved {path} (continue with --resume)", flush=True)
        log.close()
        raise
    except BaseException:
        bar.close()
        log.close()
        raise
    bar.close()

    if last_saved != step:
        save(step)
    _write_final(out, model, model_config, fmt, final_dtype, tokenizer_from, rank)
    log.close()
    D.barrier()
    if rank == 0 and cfg.progress:
        print(f"{objective.name}: {step} steps, final loss {losses[-1] if losses else float('nan'):.4f}; "
              f"model in {out}" + (f" ({stopped})" if stopped else ""), flush=True)
    return TrainResult(out, step, losses, resumed_from, stopped)


def _nan_error(step, loss, grad_norm, last_saved, ckpt_root) -> TrainError:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    if last_saved:
        keep = f"the last good checkpoint is {ckpt_root / f'step-{last_saved:08d}'} (--resume continues from it)"
    else:
        keep = "no checkpoint was saved before it (set --save-every to keep one)"
    return TrainError(f"step {step}: {what}; training stopped before the update, {keep}. "
                      "Try a lower --lr, more --warmup or --clip")


@torch.no_grad()
def _evaluate(net, objective, eval_list, device, autocast) -> dict:
    """Held-out loss, computed exactly as the training loss (same mode, same normalisation)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    stats: dict[str, torch.Tensor] = {}
    for batch in eval_list:
        count += torch.as_tensor(objective.count(batch)).to(device)
        batch = _to_device(batch, device)
        with autocast():
            part, part_stats = objective(net, batch)
        loss_sum += part.double()
        for name, v in part_stats.items():
            stats[name] = stats.get(name, 0) + v.double()
    reduced = D.all_reduce_sum(torch.stack([loss_sum, count, *[stats[n] for n in sorted(stats)]]))
    n = float(reduced[1].clamp(min=1))
    return {"eval_loss": float(reduced[0]) / n,
            **{f"eval_{name}": float(v) / n for name, v in zip(sorted(stats), reduced[2:])}}


def _prepare_reference(objective: DPO, net, model, stream: _Stream, eval_list, cfg, autocast, ckpt_root: Path,
                       step: int, start_ckpt):
    ref_file = ckpt_root / "dpo_reference.safetensors"
    if ref_file.is_file():
        objective.load_reference_tensors(load_file(str(ref_file)))
    upcoming = stream.peek((cfg.steps - step) * cfg.grad_accum)
    todo = [b for b in upcoming + (eval_list or []) if objective.missing(b)]
    rank, world = D.rank_and_world()
    any_todo = int(D.all_reduce_sum(torch.tensor(len(todo), dtype=torch.int64)))
    if not any_todo:
        return
    if start_ckpt is not None:
        raise TrainError(f"{ref_file}: DPO reference log-probs are missing for pairs this run will see (were --steps "
                         "or the data changed?); the reference is the initial model, which a resume no longer has")
    from tqdm.auto import tqdm
    n = max(D.all_gather_objects(len(todo)))
    with torch.no_grad():
        for i in tqdm(range(n), desc="dpo reference", unit="batch", disable=not (cfg.progress and rank == 0)):
            # under FSDP every rank must run the same number of forwards
            batch = todo[i] if i < len(todo) else todo[-1] if todo else upcoming[0]
            with autocast():
                objective.add_reference(net, _to_device(batch, next(model.parameters()).device))
    if world > 1:
        for table in D.all_gather_objects(objective.reference):
            objective.reference.update(table)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = ref_file.with_name(f".{ref_file.name}.tmp")
        save_file(objective.reference_tensors(), str(tmp))
        os.replace(tmp, ref_file)
    D.barrier()


def _save_checkpoint(root: Path, step: int, model, model_config, optimizer, fmt, tokenizer_from, cfg,
                     data_state, tokens_seen, objective, world, run_info) -> Path:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)               # collective under FSDP
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    rank = D.rank_and_world()[0]
    final = root / f"step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".step-{step:08d}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        write_checkpoint(staging, model_config, weights, format=fmt, tokenizer_from=tokenizer_from, overwrite=True)
        tensors, opt_meta = _optimizer_tensors(osd)
        save_file(tensors, str(staging / "optimizer.safetensors"))
        state = {"version": STATE_VERSION, "step": step, "tokens_seen": tokens_seen, "objective": objective.name,
                 "world_size": world, "data": data_state, "rng": _rng_state(), "optimizer": opt_meta,
                 "schedule": {"name": cfg.schedule, "lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps,
                              "min_lr_ratio": cfg.min_lr_ratio, "decay_frac": cfg.decay_frac},
                 "config": dataclasses.asdict(cfg), "run": run_info or {}}
        try:
            text = json.dumps(state, indent=1)
        except TypeError as e:
            raise TrainError(f"cannot save the training state as JSON ({e}); the data iterator's state_dict() "
                             "must be JSON-serializable") from None
        (staging / "trainer_state.json").write_text(text + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if cfg.keep_checkpoints:
            done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
            for _, old in done[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _load_checkpoint(path: Path, state: dict, model, optimizer, stream: _Stream, world: int) -> tuple[int, int]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    if state.get("version") != STATE_VERSION:
        raise TrainError(f"{path}/trainer_state.json: version {state.get('version')!r}, expected {STATE_VERSION}")
    if state["world_size"] != world:
        raise TrainError(f"{path}: saved by {state['world_size']} process(es), resumed with {world}; the data "
                         "position is per global batch, so resume with the same number of processes")
    cfg, _, loaders = read_checkpoint(path)
    if cfg.shapes() != model.config.shapes():
        raise TrainError(f"{path}: the checkpoint's model shape differs from the model being trained")
    weights = {name: load().to(torch.float32) for name, load in loaders.items()}
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    osd = _optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
    stream.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return state["step"], state["tokens_seen"]


def _write_final(out: Path, model, model_config, fmt, dtype, tokenizer_from, rank: int):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        staging = out / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        write_checkpoint(staging, model_config, weights, format=fmt, dtype=dtype, tokenizer_from=tokenizer_from,
                         overwrite=True)
        _publish(staging, out)


def _step_of(line: str) -> float:
    """The step of a metrics row; a row cut short by a crash counts as after any resume point."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class _Metrics:
    """OUT/metrics.jsonl (and TensorBoard) on rank 0. A resume drops rows after its step."""

    def __init__(self, out: Path, rank: int, resumed_from: int | None, tensorboard: bool):
        self.file = self.tb = None
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if resumed_from is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= resumed_from]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_from)

    def write(self, row: dict):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
