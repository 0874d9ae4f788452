"""The training loop: one loop for every objective and for whatever is trained.

    train(model, batches, objective, TrainConfig(...), out_dir) -> TrainResult

Each optimizer step draws `grad_accum` micro-batches, divides each micro-batch's summed loss by
the count of loss units over the whole step and all ranks (so accumulation and data parallelism
equal one large batch), clips, and steps AdamW at the scheduled learning rate. Weights and
AdamW stay in fp32; forwards run under bf16 autocast (or FSDP2's bf16 parameter gathering on
GPU) with --dtype bf16, and with auto where the device has native bf16 units (any GPU that
supports it; CPUs with avx512_bf16, AMX or Arm bf16), else in fp32.

What it plugs together:
    objectives.py   what is minimised: the objective protocol, with its prepare/state_dict hooks
    trainable.py    what is trained, stored in checkpoints and exported (WholeModel by default)
    state.py        the output directory, the stream position, checkpoints, exact resume
    metrics.py      OUT/metrics.jsonl and the TensorBoard / W&B trackers
    settings.py     TrainConfig, from the one table of settings the CLI and YAML files share
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import FORMATS, refusal
from ..checkpoint.io import parse_dtype
from ..errors import TrainError
from . import distributed as D
from .metrics import Metrics, Window
from .objectives import PrepareContext, to_device
from .schedule import lr_factor
from .settings import TrainConfig
from .state import Checkpoints, RunDir, Stream, latest_checkpoint, prepare_out_dir, publish
from .trainable import WholeModel

__all__ = ["train", "evaluate_loss", "TrainResult", "TrainConfig", "latest_checkpoint", "prepare_out_dir"]


@dataclass
class TrainResult:
    out_dir: Path
    step: int                         # optimizer steps completed in total
    losses: list[float]               # the loss of every step this call ran
    resumed_from: int | None          # the step a resume started at
    stopped_early: str | None = None  # why training ended before cfg.steps (data ran out)


def _prepare(objective, trainable, ctx: PrepareContext):
    """The objective's prepare hook, if it has one, with the trainable's reference policy (LoRA:
    the base with adapters off) in the context."""
    if callable(getattr(objective, "prepare", None)):
        reference = getattr(trainable, "reference", None)
        objective.prepare(dataclasses.replace(ctx, reference=reference and (lambda: reference(ctx.model))))


def train(model, batches, objective, cfg: TrainConfig, out_dir, *, eval_batches=None, resume: bool = False,
          overwrite: bool = False, trainable=None, tokenizer_from=None, format: str | None = None,
          run_info: dict | None = None) -> TrainResult:
    """Train `model` on `batches` (batch dicts for this rank; an iterable with state_dict() and
    load_state_dict() resumes without replaying) with `objective`, data-parallel under torchrun;
    checkpoints, metrics and the final model go to `out_dir` (a path, or prepare_out_dir's RunDir).

    resume: continue from the newest OUT/checkpoints/step-N (what is trained, AdamW moments,
    step, data position, RNG, objective state). overwrite: replace an existing OUT. trainable:
    what is trained (default WholeModel(): every weight). tokenizer_from: tokenizer files to
    ship with the checkpoints. format: the output format (default: the plainest that holds
    the model). run_info: JSON recorded in trainer_state.json and given to the trackers.
    """
    run = out_dir if isinstance(out_dir, RunDir) else prepare_out_dir(out_dir, resume, overwrite)
    rank, world = D.rank_and_world()
    trainable = trainable or WholeModel()
    export = _export_settings(model, format, tokenizer_from, cfg.save_dtype)   # refuse now, not after hours
    device, amp, autocast = _placement(cfg, world)
    net, params, optimizer = _setup(model, trainable, cfg, device, amp)
    stream = Stream(batches)
    ckpts = Checkpoints(run.path / "checkpoints", model, trainable, optimizer, objective, stream, cfg,
                        export, run_info)
    step, tokens_seen = ckpts.load(run.resume_from) if run.resume_from else (0, 0)
    resumed_from = step if run.resume_from else None
    eval_list = None if eval_batches is None else list(itertools.islice(eval_batches, cfg.eval_batches))
    log = Metrics(run.path, rank, resumed_from, cfg.report_to,
                  {**dataclasses.asdict(cfg), "objective": objective.name, "run": run_info or {}})
    _prepare(objective, trainable, PrepareContext(net, model, device, stream.peek, (cfg.steps - step) * cfg.grad_accum,
                                                  eval_list or [], ckpts.root, resumed_from is not None,
                                                  cfg.progress and rank == 0, autocast, None))

    bar = tqdm(total=cfg.steps, initial=step, desc=objective.name, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    window, losses, stopped = Window(), [], None
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            micro = stream.take(cfg.grad_accum)
            if micro is None:
                stopped = f"the data ran out after {step} steps"
                break
            lr = _set_lr(optimizer, cfg, step)
            loss, stats, grad_norm, step_tokens = _forward_backward(net, objective, micro, params, cfg.clip,
                                                                    device, autocast)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise _nan_error(step + 1, loss, grad_norm, ckpts)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, tokens_seen = step + 1, tokens_seen + step_tokens
            ckpts.commit()
            losses.append(loss)
            window.add(loss, stats, step_tokens, _seconds_since(t0, device))
            bar.update(1)

            do_eval = eval_list is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or do_eval:
                row = window.row(step, lr, grad_norm, tokens_seen)
                if do_eval:
                    row.update(evaluate_loss(net, objective, eval_list, device, autocast))
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                ckpts.save(step, tokens_seen)
    except KeyboardInterrupt:
        bar.close()
        if world == 1 and step > 0 and ckpts.last_saved != step:
            print(f"\ninterrupted: saved {ckpts.save(step, tokens_seen)} (continue with --resume)", flush=True)
        raise
    finally:
        bar.close()
        log.close()

    last = ckpts.save(step, tokens_seen) if ckpts.last_saved != step else ckpts.root / f"step-{step:08d}"
    publish(run.path, trainable, model, last, **export)
    if rank == 0 and cfg.progress:
        print(f"{objective.name}: {step} steps, final loss {losses[-1] if losses else float('nan'):.4f}; "
              f"model in {run.path}" + (f" ({stopped})" if stopped else ""), flush=True)
    return TrainResult(run.path, step, losses, resumed_from, stopped)


# ---------------------------------------------------------------- setting up

def _export_settings(model, format, tokenizer_from, save_dtype) -> dict:
    """How checkpoints are written, checked before any training: the format must hold the model."""
    if format is not None:
        if format not in FORMATS:
            raise TrainError(f"unknown checkpoint format {format!r}; known: {', '.join(FORMATS)}")
        why = refusal(model.config, FORMATS[format])
        if why:
            raise TrainError(f"the {format} format cannot hold this model: {why}")
    return {"format": format, "tokenizer_from": tokenizer_from, "dtype": parse_dtype(save_dtype) or model.dtype}


def _placement(cfg: TrainConfig, world: int):
    """The device, the compute dtype (None: fp32) and the autocast context for forwards (none
    under FSDP2 on GPU, which gathers parameters in bf16 itself). dtype auto: bf16 autocast where
    the device multiplies bf16 natively (GPUs; CPUs with avx512_bf16/AMX/Arm bf16), else fp32."""
    from ..quantize import autocast_dtype, native_bf16
    device = D.default_device() if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = D.default_device()
    bf16, why = native_bf16(device)
    amp = autocast_dtype(cfg.dtype, bf16)
    if cfg.progress and D.rank_and_world()[0] == 0:
        what = "bf16 autocast, fp32 master weights and AdamW" if amp else "fp32"
        print(f"precision: {what} on {device} (--dtype {cfg.dtype}: {why})", flush=True)
    if amp is None or (cfg.fsdp and device.type == "cuda"):
        return device, amp, nullcontext
    return device, amp, lambda: torch.autocast(device.type, dtype=amp)


def _setup(model, trainable, cfg: TrainConfig, device, amp):
    """The trainable's placement (fp32 master weights unless it says otherwise) on `device`, all but
    the trainable's parameters frozen, the parallel
    wrapping, and AdamW over the trainable's parameters (weight decay on matrices only)."""
    getattr(trainable, "place", WholeModel().place)(model, device, amp)
    model.train()
    chosen = {id(p) for p in trainable.parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    torch.manual_seed(cfg.seed)
    net = D.parallelize(model, fsdp=cfg.fsdp, compile=cfg.compile,
                        activation_checkpointing=cfg.activation_checkpointing,
                        param_dtype=amp if (cfg.fsdp and device.type == "cuda") else None, device=device)
    params = trainable.parameters(model)                  # after FSDP: the sharded parameters
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]   # (torch's sharded optimizer load drops an empty group's settings)
    # fused AdamW: one kernel over all tensors (on CPU 8x faster than the per-tensor loop); FSDP2's
    # DTensor shards keep the default implementation
    fused = device.type in ("cpu", "cuda") and not cfg.fsdp
    return net, params, torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


# ---------------------------------------------------------------- one step, evaluation

def _set_lr(optimizer, cfg: TrainConfig, step: int) -> float:
    lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _seconds_since(t0: float, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)         # the step's kernels are done, not just queued
    return time.perf_counter() - t0


def _count(objective, batches, device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        total += torch.as_tensor(objective.count(batch)).to(device)
    return total


def _sums(net, objective, batches, device, autocast, scale=None):
    """Σ loss and Σ statistics (float64) of `objective` over `batches`. With `scale`, each
    micro-batch's loss times `scale` is backpropagated; gradients are communicated on the last.
    A statistic given as a pair (sum, count) also sums its own count, under "NAME/count"."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stats: dict[str, torch.Tensor] = {}
    for k, batch in enumerate(batches):
        batch = to_device(batch, device)
        with D.grad_sync(net, k == len(batches) - 1) if scale is not None else nullcontext():
            with autocast():
                part, part_stats = objective(net, batch)
            if scale is not None:
                (part * scale).backward()
        loss_sum += part.detach()
        for name, v in part_stats.items():
            for key, x in zip((name, f"{name}/count"), v if isinstance(v, tuple) else (v,)):
                stats[key] = stats.get(key, 0) + torch.as_tensor(x).detach().double().to(device)
    return loss_sum, stats


def _means(stats: dict[str, torch.Tensor], count) -> dict[str, float]:
    """Each summed statistic over the loss count, or over its own count where it has one (and is not 0)."""
    out = {}
    for name, v in stats.items():
        n = stats.get(f"{name}/count", count)
        if not name.endswith("/count") and float(n) != 0:
            out[name] = float(v / n)
    return out


def _forward_backward(net, objective, micro, params, clip, device, autocast):
    """Gradients of one optimizer step, clipped: (loss, {stat: mean}, grad norm, tokens read)."""
    world = D.rank_and_world()[1]
    count = D.all_reduce_sum(_count(objective, micro, device)).clamp(min=1)
    loss_sum, stats = _sums(net, objective, micro, device, autocast, scale=world / count)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    names = sorted(stats)
    reduced = D.all_reduce_sum(torch.stack([loss_sum, *[stats[n] for n in names]]))
    return (float(reduced[0] / count), _means(dict(zip(names, reduced[1:])), count), float(grad_norm),
            sum(objective.tokens(b) for b in micro) * world)


@torch.no_grad()
def evaluate_loss(model, objective, batches, device=None, autocast=nullcontext) -> dict:
    """Held-out loss, computed exactly as the training loss (same mode, same normalisation over
    all ranks): {"eval_loss": ..., "eval_<statistic>": ...}. `device` defaults to the model's."""
    batches = list(batches)
    device = device or next(model.parameters()).device
    loss_sum, stats = _sums(model, objective, batches, device, autocast)
    names = sorted(stats)
    reduced = D.all_reduce_sum(torch.stack([loss_sum, _count(objective, batches, device),
                                            *[stats[n] for n in names]]))
    n = reduced[1].clamp(min=1)
    return {"eval_loss": float(reduced[0] / n),
            **{f"eval_{name}": v for name, v in _means(dict(zip(names, reduced[2:])), n).items()}}


def _nan_error(step, loss, grad_norm, ckpts: Checkpoints) -> TrainError:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    if ckpts.last_saved:
        keep = (f"the last good checkpoint is {ckpts.root / f'step-{ckpts.last_saved:08d}'} "
                "(--resume continues from it)")
    else:
        keep = "no checkpoint was saved before it (set --save-every to keep one)"
    return TrainError(f"step {step}: {what}; training stopped before the update, {keep}. "
                      "Try a lower --lr, more --warmup or --clip")
