"""`lmfoundry lora merge` and `lmfoundry plan` (lmfoundry.cli adds them with one call).

    lmfoundry lora merge BASE ADAPTER OUT [--dtype bf16] [--max-shard-size 5GB] [--force]
    lmfoundry plan --model PRESET_OR_DIR --method full|lora|qlora --seq-len 4096 --batch-size 1
                   [--gpus 8 --fsdp] [--activation-checkpointing] [--gpu-memory 80GB] [--lora-rank 16]
"""
from __future__ import annotations

import time
from pathlib import Path

from .errors import ConfigError


def cmd_lora_merge(args):
    """BASE with ADAPTER folded into each tensor as it is read, streamed into OUT (no model is built)."""
    from .checkpoint import Checkpoint, write_checkpoint
    t0 = time.perf_counter()
    ckpt = Checkpoint(args.base, adapter=args.adapter)
    out = write_checkpoint(args.out, ckpt.config, ckpt.loaders(), ckpt.format, None if args.dtype == "auto" else args.dtype,
                           args.max_shard_size, tokenizer_from=args.base, overwrite=args.force, progress="lora merge")
    print(f"wrote {out} ({ckpt.format.architecture}, {len(ckpt.adapter.modules)} adapted modules folded in) "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_plan(args):
    from .checkpoint import read_config
    from .config import PRESETS, ModelConfig
    from .lora import DEFAULT_TARGETS, LoraConfig
    from .memory import plan_training
    if args.model in PRESETS and not Path(args.model).exists():
        cfg = ModelConfig.from_preset(args.model)
    elif Path(args.model).is_dir():
        cfg = read_config(args.model)[0]
    else:
        raise ConfigError(f"--model {args.model}: neither a checkpoint directory nor a preset "
                          f"(presets: {', '.join(sorted(PRESETS))})")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else DEFAULT_TARGETS
    lora = None if args.method == "full" else LoraConfig(rank=args.lora_rank, targets=targets, dropout=args.lora_dropout,
                                                          dora=args.dora, qlora=args.method == "qlora")
    plan = plan_training(cfg, args.method, args.seq_len, args.batch_size, lora=lora, gpus=args.gpus, fsdp=args.fsdp,
                         activation_checkpointing=args.activation_checkpointing, device=args.device,
                         dtype=args.dtype, grad_accum=args.grad_accum,
                         rows_per_example=2 if args.dpo else 1, summed_loss=not args.dpo,
                         gpu_memory=args.gpu_memory)
    print(f"{args.model}: {cfg.num_params():,} parameters, {args.batch_size} x {args.seq_len} tokens per micro-batch"
          f"{' (x2: DPO)' if args.dpo else ''}, {args.gpus} {args.device} device(s)"
          f"{', FSDP' if args.fsdp else ', DDP' if args.gpus > 1 else ''}")
    print(plan.describe())


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def add_parser(sub):
    lo = sub.add_parser("lora", help="LoRA adapters: fold one into its base model")
    lsub = lo.add_subparsers(dest="lora_verb", required=True, metavar="ACTION")
    m = lsub.add_parser("merge", help="write BASE with ADAPTER (a PEFT LoRA directory) folded in as a plain "
                        "checkpoint, streamed tensor by tensor")
    m.add_argument("base", help="the base checkpoint directory")
    m.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("out", help="where to write the merged checkpoint (BASE's format)")
    m.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (BASE's)")
    m.add_argument("--max-shard-size", default="5GB")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.set_defaults(fn=cmd_lora_merge)

    p = sub.add_parser("plan", help="memory per device of a training run (weights, gradients, optimizer, "
                       "activations, logits) and whether it fits")
    p.add_argument("--model", required=True, help="a preset or a checkpoint directory")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--seq-len", type=positive, required=True)
    p.add_argument("--batch-size", type=positive, default=1, help="rows per micro-batch per device (1)")
    p.add_argument("--grad-accum", type=positive, default=1)
    p.add_argument("--dpo", action="store_true", help="DPO: chosen and rejected rows in one forward")
    p.add_argument("--gpus", type=positive, default=1, help="devices (data parallel; sharded with --fsdp)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory per device, e.g. 80GB, 24GiB")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16"],
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--lora-rank", type=positive, default=16)
    p.add_argument("--lora-targets", default=None, help="q,k,v,o,gate,up,down (default)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dora", action="store_true")
    p.set_defaults(fn=cmd_plan)
