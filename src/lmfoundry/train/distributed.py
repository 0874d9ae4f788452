"""Everything the loop needs to know about parallelism, in one place (torchtitan style: the
model is built unchanged, then wrapped from outside).

    init_distributed()   join the process group torchrun describes (gloo on CPU, nccl on GPU)
    parallelize(model)   activation checkpointing, torch.compile, then FSDP2 or DDP
    grad_sync(net, on)   skip the gradient all-reduce on all but the last micro-batch
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun set up in the environment (WORLD_SIZE > 1); a no-op for
    a single process or when a group already exists. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank_and_world()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def parallelize(model: nn.Module, *, fsdp: bool = False, compile: bool = False,
                activation_checkpointing: bool = False, param_dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> nn.Module:
    """Apply training-time transformations to `model.layers` and the model, in place where
    possible, and return the module the loop calls. Parameter names never change, so state
    dicts and checkpoints look the same whatever was applied.

    - activation_checkpointing: each block's forward runs under torch.utils.checkpoint
      (non-reentrant); its activations are recomputed in backward.
    - compile: each block is compiled (nn.Module.compile, per block as torchtitan).
    - fsdp: FSDP2 `fully_shard` on every block and then on the model; with `param_dtype`
      (bf16 on GPU) parameters are gathered in that dtype and gradients reduced in fp32.
    - otherwise, in a process group of more than one: DistributedDataParallel.
    """
    for block in model.layers:
        if activation_checkpointing:
            block.forward = functools.partial(_checkpointed, block.forward)
        if compile:
            block.compile()
    _, world = rank_and_world()
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if not dist.is_initialized():
            raise RuntimeError("FSDP needs a process group: launch with torchrun --nproc_per_node N")
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


@contextlib.contextmanager
def grad_sync(net: nn.Module, enabled: bool):
    """Gradient accumulation: only the last micro-batch of a step communicates gradients."""
    if enabled:
        yield
    elif hasattr(net, "no_sync"):                          # DDP
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):       # FSDP2
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier():
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
