"""LoRA fine-tuning speed and memory: lmfoundry vs transformers + PEFT (and TRL's SFTTrainer with a
peft_config when `import trl` works), and QLoRA vs LoRA peak memory on a >=1B-parameter preset.

    .venv/bin/python benchmarks/lora.py                       # CPU, 1 thread per side
    .venv/bin/python benchmarks/lora.py --qlora-preset openelm-1.1b --qlora-steps 2

1. LoRA SFT on the same Llama config, the same weights (our random model saved as a Llama
   checkpoint, loaded by transformers), the same SFT-shaped batches (labels -100 on the first half
   of every row, the "prompt"), rank 16 on q,k,v,o,gate,up,down, alpha 32, AdamW, clip 1.0,
   constant lr, fp32 (and, with --bf16, bf16 autocast with the frozen base in bf16 on both sides):
     lmfoundry   train() with lora.apply_lora + the LoRA trainable (checkpoints, metrics, export)
     peft        transformers LlamaForCausalLM + peft.get_peft_model, a plain torch loop
     trl         trl.SFTTrainer(peft_config=...) on the same token ids (its dataset preparation skipped)
   Figures: optimizer steps per CPU-second (process time, so a shared machine's load shifts wall
   time, not this) after --warmup steps, wall steps/s, and the peak RSS of each process (VmHWM:
   the whole process, imports included) and above its post-import baseline. Sides run in fresh
   subprocesses, interleaved, --rounds times; the best round of each side is reported.
2. QLoRA vs LoRA memory on a preset shape of >= 1B parameters with random weights (built straight
   into place by lora.load_lora_model), --qlora-steps steps of batch 1 x --qlora-seq tokens: peak RSS
   of each process and the planner's estimate for it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.memory import autocast_on  # noqa: E402

MODEL = dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def sft_batches(a):
    """Random token rows; labels are the next tokens on the second half of each row (the "answer")."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(a.steps):
        ids = torch.randint(0, MODEL["vocab_size"], (a.batch, a.seq_len + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : a.seq_len // 2] = -100
        out.append((ids[:, :-1].contiguous(), labels))
    return out


def base_checkpoint(tmp) -> Path:
    from lmfoundry.checkpoint import save_model
    from lmfoundry.config import ModelConfig
    from lmfoundry.model import Transformer
    torch.manual_seed(0)
    return save_model(Transformer(ModelConfig(**MODEL)), Path(tmp) / "base", format="llama")


def timed(fn, steps, warmup):
    """Run fn(step) for every step; (CPU seconds, wall seconds) of the steps after warmup."""
    cpu = wall = 0.0
    for k in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(k)
        if k >= warmup:
            cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
    return cpu, wall


# ---------------------------------------------------------------- children (one measurement each)

def child_lmfoundry(a, tmp, base, baseline):
    from lmfoundry.checkpoint import read_checkpoint
    from lmfoundry.lora import LoraConfig, load_lora_model
    from lmfoundry.train import ListBatches, SFT, TrainConfig, train
    from lmfoundry.train.trainable import LoRA
    cfg, fmt, loaders = read_checkpoint(base)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    model = load_lora_model(cfg, loaders, LoraConfig(rank=16, alpha=32, targets=TARGETS), fmt, "cpu", dtype)
    batches = [{"input_ids": ids, "labels": labels} for ids, labels in sft_batches(a)]
    cfg = TrainConfig(steps=a.steps, lr=1e-4, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999), clip=1.0,
                      progress=False, device="cpu", dtype="bfloat16" if a.bf16 else "float32")
    times = []

    class Timed(SFT):              # the loop's own step: data, forward, backward, clip, AdamW, logging
        def __call__(self, model, batch):
            times.append((time.process_time(), time.perf_counter()))
            return super().__call__(model, batch)
    train(model, ListBatches(batches), Timed(), cfg, Path(tmp) / "out", trainable=LoRA(str(base)))
    times.append((time.process_time(), time.perf_counter()))
    cpu = times[-1][0] - times[a.warmup][0]
    wall = times[-1][1] - times[a.warmup][1]
    return cpu, wall


def hf_peft_model(a, base):
    import peft
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if a.bf16 else torch.float32,
                                                          attn_implementation="sdpa")
    return model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS,
                                  task_type="CAUSAL_LM")


def child_peft(a, tmp, base, baseline):
    import peft
    model, lcfg = hf_peft_model(a, base)
    model = peft.get_peft_model(model, lcfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    batches = sft_batches(a)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)

    def step(k):
        ids, labels = batches[k]
        with autocast:
            logits = model(input_ids=ids).logits
        # the same loss as lmfoundry's SFT: mean over labelled tokens (labels are already shifted)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, a.steps, a.warmup)


def child_trl(a, tmp, base, baseline):
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    model, lcfg = hf_peft_model(a, base)
    rows = []
    for ids, labels in sft_batches(a):
        for r in range(ids.shape[0]):   # full = ids + the last label; completion mask on the answer half
            seq = ids[r].tolist() + [int(labels[r, -1])]
            rows.append({"input_ids": seq, "completion_mask": [0] * (a.seq_len // 2 + 1) + [1] * (a.seq_len // 2)})
    SFTTrainer._prepare_dataset = lambda self, dataset, *args, **kw: dataset
    args = SFTConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, bf16=a.bf16, seed=0, max_length=a.seq_len + 1, completion_only_loss=True,
                     packing=False, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False)
    marks = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kw):
            marks.append((time.process_time(), time.perf_counter()))

        def on_train_end(self, *args, **kw):
            marks.append((time.process_time(), time.perf_counter()))

    tok_dir = Path(tmp) / "tok"
    from lmfoundry.demo import make_demo_checkpoint
    tokenizer = transformers.AutoTokenizer.from_pretrained(make_demo_checkpoint(tok_dir))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lcfg, callbacks=[Timer()])
    trainer.train()
    return marks[-1][0] - marks[a.warmup][0], marks[-1][1] - marks[a.warmup][1]


def child_qlora_memory(a, tmp, base, baseline):
    from lmfoundry.config import ModelConfig
    from lmfoundry.lora import LoraConfig, load_lora_model
    from lmfoundry.memory import plan_training
    from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
    from lmfoundry.train.trainable import LoRA
    cfg = ModelConfig.from_preset(a.qlora_preset)
    lcfg = LoraConfig(rank=16, targets=TARGETS, qlora=a.method == "qlora")
    t0 = time.perf_counter()
    compute = torch.bfloat16 if autocast_on("cpu", "auto") else torch.float32   # as the recipe builds it
    model = load_lora_model(cfg, None, lcfg, None, "cpu", compute)
    built = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, a.qlora_seq + 1), generator=g)
    batches = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]
    train(model, ListBatches(batches), NextToken(), TrainConfig(steps=a.qlora_steps, lr=1e-4, progress=False),
          Path(tmp) / "out", trainable=LoRA())
    plan = plan_training(cfg, a.method, a.qlora_seq, 1, lora=lcfg, device="cpu")
    return {"params": cfg.num_params(), "plan": plan.total, "build_s": built, "total_s": time.perf_counter() - t0}


CHILDREN = {"lmfoundry": child_lmfoundry, "peft": child_peft, "trl": child_trl, "qlora-memory": child_qlora_memory}


def child_main(a):
    torch.set_num_threads(1)
    import lmfoundry.train  # noqa: F401  (imports are part of the baseline, on both sides)
    if a.child in ("peft", "trl"):
        import peft  # noqa: F401
        import transformers  # noqa: F401
        if a.child == "trl":
            import trl  # noqa: F401
    if a.child == "qlora-memory" and a.method == "qlora":
        from lmfoundry.lora import _nf4
        _nf4()
    baseline = status_bytes("VmRSS:")
    with tempfile.TemporaryDirectory() as tmp:
        base = base_checkpoint(tmp) if a.child != "qlora-memory" else None
        after_setup = status_bytes("VmRSS:")
        out = CHILDREN[a.child](a, tmp, base, baseline)
    result = out if isinstance(out, dict) else {"steps_per_cpu_s": (a.steps - a.warmup) / out[0],
                                                "steps_per_wall_s": (a.steps - a.warmup) / out[1]}
    result.update(peak_rss=status_bytes("VmHWM:"), baseline_rss=after_setup)
    print(json.dumps(result))


def run_child(name, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", name, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n):
    return f"{n / 2**20:,.0f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, frozen base in bf16 (both sides)")
    ap.add_argument("--qlora-preset", default="openelm-1.1b")
    ap.add_argument("--qlora-seq", type=int, default=128)
    ap.add_argument("--qlora-steps", type=int, default=2)
    ap.add_argument("--skip-qlora", action="store_true")
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--child", default=None)
    ap.add_argument("--method", default="lora")
    a = ap.parse_args()
    if a.child:
        return child_main(a)
    argv = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
            "--qlora-preset", a.qlora_preset, "--qlora-seq", str(a.qlora_seq), "--qlora-steps", str(a.qlora_steps)]
    argv += ["--bf16"] if a.bf16 else []
    print(f"machine: {os.cpu_count()} CPUs (shared with other jobs: ratios are per CPU-second), torch "
          f"{torch.__version__}, 1 thread per side")
    if not a.skip_sft:
        sides = ["lmfoundry", "peft"]
        try:
            import trl  # noqa: F401
            sides.append("trl")
        except ImportError:
            print("trl not importable: its SFTTrainer side is skipped")
        best: dict[str, dict] = {}
        for _ in range(a.rounds):
            for side in sides:
                r = run_child(side, argv)
                if "error" in r:
                    print(f"{side}: {r['error']}")
                    continue
                if side not in best or r["steps_per_cpu_s"] > best[side]["steps_per_cpu_s"]:
                    best[side] = r
        ours = best.get("lmfoundry")
        print(f"\nLoRA SFT, {MODEL}, batch {a.batch} x {a.seq_len}, r=16 all-linear, "
              f"{'bf16' if a.bf16 else 'fp32'}, {a.steps - a.warmup} timed steps, best of {a.rounds}")
        print(f"{'side':<10} {'steps/CPU-s':>12} {'steps/s wall':>13} {'peak RSS':>10} {'above baseline':>15}")
        for side, r in best.items():
            print(f"{side:<10} {r['steps_per_cpu_s']:>12.3f} {r['steps_per_wall_s']:>13.3f} {mb(r['peak_rss']):>10} "
                  f"{mb(r['peak_rss'] - r['baseline_rss']):>15}")
        for side, r in best.items():
            if ours and side != "lmfoundry":
                print(f"lmfoundry vs {side}: {ours['steps_per_cpu_s'] / r['steps_per_cpu_s']:.2f}x steps/CPU-s, "
                      f"{ours['peak_rss'] / r['peak_rss']:.2f}x peak RSS, "
                      f"{(ours['peak_rss'] - ours['baseline_rss']) / (r['peak_rss'] - r['baseline_rss']):.2f}x "
                      "above baseline")
    if not a.skip_qlora:
        res = {m: run_child("qlora-memory", [*argv, "--method", m]) for m in ("lora", "qlora")}
        print(f"\nQLoRA vs LoRA memory, preset {a.qlora_preset} (random weights), batch 1 x {a.qlora_seq}, "
              f"{a.qlora_steps} steps, dtype auto on CPU (bf16 base and autocast where the CPU has bf16 units: "
              f"{'yes' if autocast_on('cpu', 'auto') else 'no'})")
        for m, r in res.items():
            if "error" in r:
                print(f"{m}: {r['error']}")
                continue
            print(f"{m:<6} params {r['params'] / 1e9:.2f} B  peak RSS {mb(r['peak_rss'])}  above baseline "
                  f"{mb(r['peak_rss'] - r['baseline_rss'])}  planned {mb(r['plan'])}  ({r['total_s']:.0f}s)")
        if all("error" not in r for r in res.values()):
            q, lo = res["qlora"], res["lora"]
            print(f"QLoRA / LoRA peak RSS: {q['peak_rss'] / lo['peak_rss']:.2f}x "
                  f"({(q['peak_rss'] - q['baseline_rss']) / (lo['peak_rss'] - lo['baseline_rss']):.2f}x above baseline)")


if __name__ == "__main__":
    main()
