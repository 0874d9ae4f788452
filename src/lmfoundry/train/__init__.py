"""Training: one loop, objectives plugged in, distributed wrapping in one place.

    from lmfoundry.train import TrainConfig, train, NextToken, SFT, DPO
    train(model, batches, NextToken(), TrainConfig(steps=1000, lr=3e-4, warmup=100), "runs/pretrain")

    loop.py        train(), TrainConfig, checkpoints and exact resume, metrics
    objectives.py  NextToken, SFT (masked next-token), DPO (sigmoid / IPO as TRL computes them)
    schedule.py    warmup + cosine / WSD / constant learning rates
    distributed.py torchrun process group, DDP / FSDP2 / activation checkpointing / compile
    recipe.py      what the `pretrain`, `sft` and `dpo` commands run: model + data + objective
"""
from .distributed import init_distributed, parallelize
from .loop import ListBatches, TrainConfig, TrainError, TrainResult, latest_checkpoint, prepare_out_dir, train
from .objectives import DPO, SFT, NextToken, dpo_loss, sequence_logps
from .schedule import lr_factor

__all__ = ["train", "TrainConfig", "TrainResult", "TrainError", "ListBatches", "latest_checkpoint", "prepare_out_dir",
           "NextToken", "SFT", "DPO", "dpo_loss", "sequence_logps", "lr_factor", "init_distributed", "parallelize"]
