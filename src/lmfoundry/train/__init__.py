"""Training: one loop, objectives and what is trained plugged in, distributed wrapping in one place.

    from lmfoundry.train import TrainConfig, train, NextToken, SFT, DPO
    train(model, batches, NextToken(), TrainConfig(steps=1000, lr=3e-4, warmup=100), "runs/pretrain")

    loop.py        train(): the loop; evaluate_loss()
    objectives.py  the objective protocol; NextToken, SFT (masked next-token), DPO (sigmoid / IPO as TRL)
    trainable.py   the "what is trained" protocol; WholeModel (every weight)
    state.py       output directory, batch-stream position, checkpoints and exact resume
    metrics.py     metrics.jsonl, TensorBoard, W&B
    settings.py    the one table of settings: CLI flags, YAML keys, TrainConfig
    schedule.py    warmup + cosine / WSD / constant learning rates
    distributed.py torchrun process group, DDP / FSDP2 / activation checkpointing / compile
    recipe.py      what the training commands run: model + data + objective (+ what is trained)
    reward.py      reward models: RewardModel, BradleyTerry, RewardModelWeights, load_reward_model, score_pairs
    rollout.py     online data: PromptBatches, sampling, scorers (Verifier, RewardModelScorer, JudgeScorer)
    online.py      OnlineDPO and GRPO (TRL's loss types)
"""
from ..errors import TrainError
from .distributed import init_distributed, parallelize
from .loop import TrainResult, evaluate_loss, train
from .objectives import DPO, SFT, NextToken, PrepareContext, dpo_loss, sequence_logps, token_logps
from .online import GRPO, OnlineDPO
from .reward import BradleyTerry, RewardModel, RewardModelWeights, load_reward_model, score_pairs
from .rollout import JudgeScorer, PromptBatches, RewardModelScorer, Verifier
from .schedule import lr_factor
from .settings import TrainConfig
from .state import ListBatches, RunDir, latest_checkpoint, prepare_out_dir
from .trainable import WholeModel

__all__ = ["train", "evaluate_loss", "TrainConfig", "TrainResult", "TrainError", "ListBatches", "RunDir",
           "latest_checkpoint", "prepare_out_dir", "NextToken", "SFT", "DPO", "PrepareContext", "WholeModel",
           "dpo_loss", "sequence_logps", "token_logps", "lr_factor", "init_distributed", "parallelize",
           "OnlineDPO", "GRPO", "BradleyTerry", "RewardModel", "RewardModelWeights", "load_reward_model",
           "score_pairs", "PromptBatches", "Verifier", "RewardModelScorer", "JudgeScorer"]
