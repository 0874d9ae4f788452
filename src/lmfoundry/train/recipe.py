"""What `lmfoundry pretrain | sft | dpo | reward | online-dpo | grpo` run: a model, data, an
objective and what is trained, handed to train().

    run("pretrain", resolve("pretrain", {"model": "tiny", "tokenizer": "tok/", "data": ["corpus.txt"],
                                         "out": "runs/a", "steps": 100}))

The settings (defaults < a YAML file < flags) come from lmfoundry.train.settings: resolve()
gives every setting of a command, run() builds what they describe and trains.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from ..errors import TrainError
from . import distributed as D
from .loop import train
from .settings import ONLINE, VERBS, flag, resolve, train_config
from .state import prepare_out_dir

__all__ = ["run", "resolve", "build_model", "VERBS"]


def build_model(spec: str, tokenizer, seed: int, lora=None, device=None, dtype=None):
    """A checkpoint directory (loaded as is) or a preset (random init, special token ids taken
    from the tokenizer). With `lora` (a LoraConfig): adapters on a frozen base read straight onto
    `device` in `dtype` (QLoRA: NF4 as it is read), see lora.load_lora_model."""
    import torch

    from ..checkpoint import load_model, read_checkpoint
    from ..config import PRESETS, ModelConfig
    from ..model import Transformer
    if Path(spec).is_dir():
        if lora is None:
            model = load_model(spec)
        else:
            from ..lora import load_lora_model
            cfg, fmt, loaders = read_checkpoint(spec)
            model = load_lora_model(cfg, loaders, lora, fmt, device or "cpu", dtype or torch.float32, seed)
    elif spec in PRESETS:
        cfg = ModelConfig.from_preset(spec)
        if tokenizer is not None:
            ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
            cfg = cfg.replace(**{f"{k}_token_id": v for k, v in ids.items() if v is not None})
        torch.manual_seed(seed)
        if lora is None:
            model = Transformer(cfg)
        else:
            from ..lora import load_lora_model
            model = load_lora_model(cfg, None, lora, None, device or "cpu", dtype or torch.float32, seed)
    else:
        raise TrainError(f"--model {spec}: neither a checkpoint directory nor a preset "
                         f"(presets: {', '.join(sorted(PRESETS))})")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise TrainError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}")
    return model


def _tokenized_dir(files, tokenizer_dir, text_field, given: str | None) -> Path:
    if given:
        return Path(given)
    from ..data.corpus import tokenizer_fingerprint
    from ..records import expand_files
    h = hashlib.sha256()
    for f in expand_files(files):
        h.update(str(Path(f).resolve()).encode() + b"\0")
    h.update(tokenizer_fingerprint(tokenizer_dir).encode() + text_field.encode())
    root = Path(os.environ.get("LMFOUNDRY_CACHE") or Path.home() / ".cache" / "lmfoundry")
    return root / "tokenized" / h.hexdigest()[:16]


def _corpus(files, tokenizer_dir, text_field, where, progress):
    """Tokenize once (rank 0), then every rank opens the shards."""
    from ..data import tokenize_corpus
    rank, _ = D.rank_and_world()
    if rank == 0:
        ds = tokenize_corpus(files, tokenizer_dir, where, text_field=text_field, progress=progress)
    D.barrier()
    if rank != 0:
        ds = tokenize_corpus(files, tokenizer_dir, where, text_field=text_field, progress=False)
    return ds


def _sources(entries, tokenizer_dir, opts, suffix=""):
    """--data files -> PackedBatches sources. YAML may give {name, path(s), weight} entries for a mixture."""
    plain = [e for e in entries if not isinstance(e, dict)]
    mixture = [e for e in entries if isinstance(e, dict)]
    sources = {}
    if plain:
        where = _tokenized_dir(plain, tokenizer_dir, opts["text_field"], opts["tokenized"] and
                               str(Path(opts["tokenized"]) / f"corpus{suffix}"))
        sources["corpus"] = (_corpus(plain, tokenizer_dir, opts["text_field"], where, opts["progress"]), 1.0)
    for i, e in enumerate(mixture):
        files = e.get("paths") or e.get("path")
        if not files:
            raise TrainError(f"data entry {i}: needs 'path' (or 'paths')")
        name = str(e.get("name", f"source{i}"))
        where = _tokenized_dir(files, tokenizer_dir, opts["text_field"], opts["tokenized"] and
                               str(Path(opts["tokenized"]) / f"{name}{suffix}"))
        sources[name] = (_corpus(files, tokenizer_dir, opts["text_field"], where, opts["progress"]),
                         float(e.get("weight", 1.0)))
    return sources


def run(verb: str, opts: dict):
    """Build everything `opts` (from resolve()) describes and train. Returns the TrainResult."""
    from ..checkpoint import read_config
    from ..tokenizer import load_tokenizer
    if verb not in VERBS:
        raise TrainError(f"unknown training verb {verb!r}")
    run_dir = prepare_out_dir(opts["out"], opts["resume"], opts["overwrite"])   # before any expensive work
    try:
        model_dir = opts["model"] if Path(opts["model"]).is_dir() else None
        tokenizer_dir = opts["tokenizer"] or model_dir
        if tokenizer_dir is None:
            raise TrainError(f"--model {opts['model']} is a preset, which has no tokenizer: give --tokenizer DIR")
        tokenizer = load_tokenizer(tokenizer_dir)
        lora = lora_config(opts)
        fmt = opts["format"] or (read_config(model_dir)[1].name if model_dir else None)
        model, trainable = _model_and_trainable(verb, opts, tokenizer, fmt, lora, model_dir)
        if opts.get("seq_len", 0) > model.config.max_seq_len:
            raise TrainError(f"--seq-len {opts['seq_len']} is longer than the model's context "
                             f"{model.config.max_seq_len}")
        if "seq_len" in opts and D.rank_and_world()[0] == 0 and opts["progress"]:
            print(memory_plan(verb, opts, model.config, lora).describe(), flush=True)
        if verb in ONLINE:
            batches, eval_batches, objective = _online(verb, opts, tokenizer, model, lora)
        else:
            batches, eval_batches, objective = _data_and_objective(verb, opts, tokenizer, tokenizer_dir)
        steps = opts["steps"]
        if "steps" not in opts["_given"] and opts.get("epochs"):
            steps = max(1, math.ceil(len(batches) / opts["grad_accum"]))   # exactly the epochs asked for
        info = {"verb": verb, **{k: v for k, v in opts.items() if not k.startswith("_")}}
        return train(model, batches, objective, train_config(opts, steps=steps), run_dir, eval_batches=eval_batches,
                     tokenizer_from=tokenizer_dir, format=fmt, run_info=info, trainable=trainable)
    finally:
        if D.rank_and_world()[1] > 1 and D.dist.is_initialized():
            D.dist.destroy_process_group()


LORA_SETTINGS = ("lora_alpha", "lora_dropout", "lora_targets", "rslora", "dora", "qlora")


def lora_config(opts: dict):
    """The LoraConfig the settings describe, or None (no --lora-rank: every weight is trained)."""
    from ..lora import LoraConfig
    if opts.get("lora_rank") is None:
        given = [k for k in LORA_SETTINGS if k in opts.get("_given", ())]
        if given:
            raise TrainError(f"{flag(given[0])} configures LoRA adapters: give --lora-rank R too")
        return None
    if "lm_head" in opts["lora_targets"] and opts["lora_dropout"] > 0:     # refused before anything is written
        raise TrainError("--lora-dropout with lm_head in --lora-targets: the loss multiplies by the output layer's "
                         "merged weight, which cannot drop inputs; use --lora-dropout 0 or leave lm_head out")
    return LoraConfig(rank=opts["lora_rank"], alpha=opts["lora_alpha"], dropout=opts["lora_dropout"],
                      targets=tuple(opts["lora_targets"]), rslora=opts["rslora"], dora=opts["dora"],
                      qlora=opts["qlora"])


def _base_placement(opts: dict):
    """Where a LoRA base is built: the training device, in the compute dtype (the loop's rule,
    which the planner follows too: bf16 where autocast will run, so a bf16 CPU never holds the
    base in fp32 first; the trainable's place() has the last word)."""
    import torch

    from ..memory import autocast_on
    device = D.default_device() if opts["device"] == "auto" else torch.device(opts["device"])
    return device, torch.bfloat16 if autocast_on(device.type, opts["dtype"]) else torch.float32


def memory_plan(verb: str, opts: dict, cfg, lora):
    """The planner's estimate for this run (printed once at its start)."""
    from ..memory import plan_training
    method = "full" if lora is None else "qlora" if lora.qlora else "lora"
    device, _ = _base_placement(opts)
    world = D.rank_and_world()[1]
    return plan_training(cfg, method, opts["seq_len"], opts["batch_size"], lora=lora, gpus=world,
                         fsdp=opts["fsdp"], activation_checkpointing=opts["activation_checkpointing"],
                         device=device.type, dtype=opts["dtype"], grad_accum=opts["grad_accum"],
                         rows_per_example=2 if verb in ("dpo", "reward") else 1,
                         summed_loss=verb in ("pretrain", "sft"))


def _model_and_trainable(verb: str, opts: dict, tokenizer, fmt, lora, model_dir):
    """The model train() steps and what of it is trained (None: every weight; LoRA: the adapters
    on a frozen base). `reward`: a reward model, continued from a reward-model checkpoint or a new
    score head on a causal LM."""
    if verb in ("dpo", "online-dpo") and not opts["beta"] > 0:
        raise TrainError(f"{flag('beta')} must be > 0 for {verb}, got {opts['beta']}")
    base = str(Path(model_dir).resolve()) if model_dir else opts["model"]
    if verb != "reward":
        from .trainable import LoRA
        model = build_model(opts["model"], tokenizer, opts["seed"], lora, *_base_placement(opts))
        return model, None if lora is None else LoRA(base_model=base)
    import torch

    from ..checkpoint import read_config
    from ..lora import apply_lora
    from .reward import RewardModel, RewardModelAdapters, RewardModelWeights, load_reward_model, seq_cls_format
    if lora is not None and "lm_head" in lora.targets:
        raise TrainError("--lora-targets lm_head: a reward model has no LM head (its score head is trained in full)")
    spec = opts["model"]
    if Path(spec).is_dir() and read_config(spec)[1].head == "score":
        model = load_reward_model(spec)
        torch.manual_seed(opts["seed"])
        if lora is not None:
            apply_lora(model.body, lora)
    else:
        body = build_model(spec, tokenizer, opts["seed"], lora, *_base_placement(opts))
        torch.manual_seed(opts["seed"])
        model = RewardModel(body)
    seq_cls_format(model.config, fmt)           # refuse a family without a sequence classifier now
    return model, RewardModelWeights() if lora is None else RewardModelAdapters(base_model=base)


def _scorer(opts: dict):
    """The one scorer --reward, --verifier or --judge names."""
    import os

    from .rollout import VERIFIERS, JudgeScorer, RewardModelScorer, Verifier
    given = [k for k in ("reward", "verifier", "judge") if opts[k]]
    if len(given) != 1:
        raise TrainError(f"give exactly one scorer: --reward RM, --verifier {'|'.join(VERIFIERS)} or --judge URL"
                         + (f" (got {' and '.join(flag(k) for k in given)})" if given else ""))
    if opts["reward"]:
        return RewardModelScorer(opts["reward"], batch_size=opts["batch_size"] * opts["num_generations"])
    if opts["verifier"]:
        return Verifier(opts["verifier"], opts["answer_field"])
    return JudgeScorer(opts["judge"], opts["judge_model"], os.environ.get("OPENAI_API_KEY"),
                       cache=opts["judge_cache"] or Path(opts["out"]) / "judge_cache.jsonl",
                       reference_field=opts["answer_field"])


def _online(verb: str, opts: dict, tokenizer, model, lora):
    """(prompt batches, None, objective) of online-dpo / grpo. The reference (the initial policy,
    for online DPO and for GRPO with beta > 0) is built from --model again, so a resume has it;
    with LoRA it is the policy with its adapters off (the trainable's), no second model."""
    from ..generate import SamplingParams
    from .online import GRPO, OnlineDPO
    from .rollout import PromptBatches
    rank, world = D.rank_and_world()
    room = model.config.max_seq_len - opts["max_new_tokens"]
    if room < 1:
        raise TrainError(f"--max-new-tokens {opts['max_new_tokens']} leaves no room for a prompt in the model's "
                         f"context of {model.config.max_seq_len} tokens")
    scorer = _scorer(opts)
    params = SamplingParams(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"],
                            top_p=opts["top_p"], top_k=opts["top_k"])
    grpo = verb == "grpo"
    batches = PromptBatches([str(f) for f in opts["prompts"]], tokenizer, opts["batch_size"], opts["seed"],
                            field=opts["prompt_field"], required=scorer.required, why=getattr(scorer, "why", ""),
                            repeat=opts["num_iterations"] if grpo else 1, group=opts["grad_accum"], rank=rank,
                            world_size=world, max_prompt_tokens=room)
    wanted = lora is None and (not grpo or opts["beta"] > 0)
    reference = build_model(opts["model"], tokenizer, opts["seed"]) if wanted else None
    common = dict(tokenizer=tokenizer, num_generations=opts["num_generations"], beta=opts["beta"],
                  reference=reference, seed=opts["seed"])
    if grpo:
        objective = GRPO(scorer, params, epsilon=opts["epsilon"], epsilon_high=opts["epsilon_high"],
                         loss_type=opts["loss_type"], scale_rewards=opts["scale_rewards"],
                         num_iterations=opts["num_iterations"], mask_truncated=opts["mask_truncated"],
                         kl_bias_correction=opts["kl_bias_correction"], **common)
    else:
        objective = OnlineDPO(scorer, params, loss_type=opts["loss"], label_smoothing=opts["label_smoothing"], **common)
    return batches, None, objective


def _data_and_objective(verb: str, opts: dict, tokenizer, tokenizer_dir):
    """(training batches, held-out batches or None, objective) for this rank."""
    from ..data import DPOBatches, PackedBatches, SFTBatches
    from .objectives import DPO, SFT, NextToken
    rank, world = D.rank_and_world()
    seq_len, batch_size, seed = opts["seq_len"], opts["batch_size"], opts["seed"]
    shard = {"rank": rank, "world_size": world}
    if verb == "pretrain":
        batches = PackedBatches(_sources(opts["data"], tokenizer_dir, opts), seq_len, batch_size, seed,
                                opts["stages"], **shard)
        eval_batches = (PackedBatches(_sources(opts["eval_data"], tokenizer_dir, opts, "-eval"), seq_len, batch_size,
                                      seed, **shard) if opts["eval_data"] else None)
        return batches, eval_batches, NextToken()
    cls = SFTBatches if verb == "sft" else DPOBatches
    show = opts["progress"] and rank == 0
    batches = cls([str(f) for f in opts["data"]], tokenizer, seq_len, batch_size, seed, epochs=opts["epochs"],
                  progress=show, **shard)
    eval_batches = (cls([str(f) for f in opts["eval_data"]], tokenizer, seq_len, batch_size, seed, epochs=1,
                        progress=show, **shard) if opts["eval_data"] else None)
    if verb == "reward":
        from .reward import BradleyTerry
        objective = BradleyTerry(opts["center_rewards_coefficient"], opts["margin"])
    else:
        objective = SFT() if verb == "sft" else DPO(opts["beta"], opts["label_smoothing"], opts["loss"])
    return batches, eval_batches, objective
