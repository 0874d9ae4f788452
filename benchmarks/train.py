"""Training throughput and peak memory: lmfoundry vs what users would otherwise write or run.

    .venv/bin/python benchmarks/train.py                       # CPU, fp32, ~10M-parameter Llama
    PYTHONPATH=/path/to/trl_pkgs .venv/bin/python benchmarks/train.py   # also DPO vs TRL's DPOTrainer

1. Next-token training: lmfoundry's train() vs a plain transformers LlamaForCausalLM + AdamW
   loop (forward with labels, backward, clip 1.0, step), same weights (the lmfoundry model is
   saved as a Llama checkpoint and loaded by transformers), same random-token batches, same
   steps. Figure: tokens/s over the steps after --warmup, and peak RSS of the process.
2. DPO: lmfoundry's DPO objective vs TRL's DPOTrainer (if `import trl` works) on the same
   model and the very same token ids (our DPOBatches pairs handed to TRL pre-tokenized, so
   TRL's chat-template rendering is bypassed), one batch of pairs repeated each step so the
   sampler order cannot differ. Figure: optimizer steps/s after --warmup, reference pass
   included in the run but not in the step time; TRL runs both with its live reference model
   (its default) and with precompute_ref_log_probs=True. The per-step losses of both are
   printed side by side as a parity check (fp32, constant lr, same AdamW).

Each measurement runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to it alone.
TRL is never installed into the project environment: put it on PYTHONPATH from a separate
directory (`pip install --target DIR --no-deps trl accelerate psutil`), keeping torch as is.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODEL = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=1024)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(seed=0):
    from lmfoundry.config import ModelConfig
    from lmfoundry.model import Transformer
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**MODEL))


def token_batches(n, batch, seq_len):
    """Random token rows; both sides read seq_len tokens and predict tokens 1..seq_len-1."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, MODEL["vocab_size"], (batch, seq_len), generator=g) for _ in range(n)]


# ---------------------------------------------------------------- children (one measurement each)

def child_lmfoundry(a, tmp):
    from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
    batches = [{"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)}
               for ids in token_batches(a.steps, a.batch, a.seq_len)]
    cfg = TrainConfig(steps=a.steps, lr=a.lr, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999), clip=1.0,
                      progress=False, device="cpu", dtype="float32")
    train(make_model(), ListBatches(batches), NextToken(), cfg, Path(tmp) / "out")
    rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[a.warmup:]
    step_tokens = a.batch * a.seq_len
    secs = sum(step_tokens / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": step_tokens * len(timed) / secs, "losses": [r["loss"] for r in rows]}


def child_transformers(a, tmp):
    import transformers

    from lmfoundry.checkpoint import save_model
    save_model(make_model(), Path(tmp) / "hf", format="llama")
    model = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), weight_decay=0.0)
    times, losses = [], []
    for ids in token_batches(a.steps, a.batch, a.seq_len):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss       # transformers shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[a.warmup:]
    return {"tokens_per_s": a.batch * a.seq_len * len(timed) / sum(timed), "losses": losses}


def dpo_data(a, tokenizer_dir):
    """Our DPOBatches over synthetic chat preference records; the one batch every step uses."""
    from lmfoundry.data import DPOBatches
    from lmfoundry.tokenizer import load_tokenizer
    words = "the model learns which answer people prefer and why that answer is better than the other".split()
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(a.batch):
        pick = lambda n: " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))  # noqa
        records.append({"prompt": f"Question {i}: {pick(12)}?", "chosen": pick(a.dpo_len), "rejected": pick(a.dpo_len)})
    it = DPOBatches(records, load_tokenizer(tokenizer_dir), seq_len=a.dpo_seq_len, batch_size=a.batch, progress=False)
    return it


def child_dpo_lmfoundry(a, tmp):
    from lmfoundry.demo import make_demo_checkpoint
    from lmfoundry.train import DPO, ListBatches, TrainConfig, train
    tok = make_demo_checkpoint(Path(tmp) / "tok")
    batch = next(dpo_data(a, tok))
    cfg = TrainConfig(steps=a.dpo_steps, lr=a.dpo_lr, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999),
                      clip=1.0, progress=False, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    train(make_model(), ListBatches([batch]), DPO(beta=0.1), cfg, Path(tmp) / "out")
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    step_tokens = batch["chosen_input_ids"].numel() * 2
    secs = [step_tokens / r["tokens_per_s"] for r in rows][a.warmup:]
    return {"steps_per_s": len(secs) / sum(secs), "total_s": total, "losses": [r["loss"] for r in rows]}


def child_dpo_trl(a, tmp, precompute):
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmfoundry.checkpoint import save_model
    from lmfoundry.demo import make_demo_checkpoint
    tok_dir = make_demo_checkpoint(Path(tmp) / "tok")
    it = dpo_data(a, tok_dir)
    rows = []
    for c_ids, c_lab, r_ids, r_lab in it.pairs:     # back from (ids, shifted labels) to TRL's three id lists
        lab_c, lab_r = torch.as_tensor(c_lab), torch.as_tensor(r_lab)
        p = int((lab_c != -100).nonzero()[0]) + 1
        end_c, end_r = int((lab_c != -100).nonzero()[-1]) + 2, int((lab_r != -100).nonzero()[-1]) + 2
        assert list(c_ids[:p]) == list(r_ids[:p]) and int((lab_r != -100).nonzero()[0]) + 1 == p
        rows.append({"prompt_ids": [int(x) for x in c_ids[:p]], "chosen_ids": [int(x) for x in c_ids[p:end_c]],
                     "rejected_ids": [int(x) for x in r_ids[p:end_r]]})
    hf_dir = Path(tmp) / "hf"
    save_model(make_model(), hf_dir, format="llama", tokenizer_from=tok_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                                              attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    # Hand TRL our token ids as they are (its own chat-template tokenisation would differ in
    # details such as the newline after <|im_end|>): skip its dataset preparation.
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kw: dataset
    args = DPOConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=a.batch, max_steps=a.dpo_steps,
                     learning_rate=a.dpo_lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
                     beta=0.1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                     seed=0, max_length=a.dpo_seq_len, precompute_ref_log_probs=precompute,
                     dataloader_num_workers=0, disable_tqdm=True)
    losses, times = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Timer()])
    compute_loss = trainer.compute_loss

    def recording(*args, **kw):
        out = compute_loss(*args, **kw)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out
    trainer.compute_loss = recording
    trainer.train()
    total = time.perf_counter() - t0
    timed = times[a.warmup:]
    return {"steps_per_s": len(timed) / sum(timed), "total_s": total, "losses": losses}


CHILDREN = {"lmfoundry": child_lmfoundry, "transformers": child_transformers, "dpo-lmfoundry": child_dpo_lmfoundry,
            "dpo-trl": lambda a, t: child_dpo_trl(a, t, False),
            "dpo-trl-precompute": lambda a, t: child_dpo_trl(a, t, True)}


def run_child(name, argv):
    cmd = [sys.executable, __file__, "--child", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dpo-steps", type=int, default=15)
    ap.add_argument("--dpo-seq-len", type=int, default=128)
    ap.add_argument("--dpo-len", type=int, default=40, help="words per chosen/rejected answer")
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    if a.child:
        with tempfile.TemporaryDirectory() as tmp:
            result = CHILDREN[a.child](a, tmp)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    import transformers
    argv = sys.argv[1:]
    from lmfoundry.config import ModelConfig
    params = ModelConfig(**MODEL).num_params()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads, CPU fp32; "
          f"Llama {params / 1e6:.1f}M params ({MODEL}); batch {a.batch} x seq {a.seq_len}, {a.steps} steps "
          f"({a.warmup} untimed)")
    ours, theirs = run_child("lmfoundry", argv), run_child("transformers", argv)
    print("\nnext-token training     tokens/s   peak RSS MB")
    for name, r in (("lmfoundry", ours), ("transformers+AdamW", theirs)):
        print(f"  {name:<20} {r.get('tokens_per_s', 0):>9,.0f}   {r.get('peak_rss_mb', 0):>9,.0f}   "
              f"{r.get('error', '')}")
    if "error" not in ours and "error" not in theirs:
        print(f"  ratio lmfoundry / transformers: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s, "
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x peak RSS")
        print(f"  first losses: lmfoundry {[round(x, 4) for x in ours['losses'][:3]]}, "
              f"transformers {[round(x, 4) for x in theirs['losses'][:3]]} (same weights and tokens)")
    if a.skip_dpo:
        return
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    print(f"\nDPO (beta 0.1, sigmoid), batch {a.batch} pairs x seq {a.dpo_seq_len}, {a.dpo_steps} steps; TRL "
          f"{trl_version or 'not importable: skipped (see the docstring)'}")
    runs = {"lmfoundry (precomputed ref)": run_child("dpo-lmfoundry", argv)}
    if trl_version:
        runs["TRL DPOTrainer (live ref)"] = run_child("dpo-trl", argv)
        runs["TRL (precompute_ref_log_probs)"] = run_child("dpo-trl-precompute", argv)
    print("                                  steps/s   run s   peak RSS MB")
    for name, r in runs.items():
        print(f"  {name:<31} {r.get('steps_per_s', 0):>7.2f}  {r.get('total_s', 0):>6.1f}   "
              f"{r.get('peak_rss_mb', 0):>9,.0f}   {r.get('error', '')}")
    ours = runs["lmfoundry (precomputed ref)"]
    for name, r in list(runs.items())[1:]:
        if "error" in r or "error" in ours:
            continue
        print(f"  ratio lmfoundry / {name}: {ours['steps_per_s'] / r['steps_per_s']:.2f}x steps/s, "
              f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak RSS")
        diff = max(abs(x - y) for x, y in zip(ours["losses"], r["losses"]))
        print(f"    loss parity over {min(len(ours['losses']), len(r['losses']))} steps: max |diff| {diff:.2e}; "
              f"step 1: {ours['losses'][0]:.7f} vs {r['losses'][0]:.7f}; last: {ours['losses'][-1]:.5f} vs "
              f"{r['losses'][-1]:.5f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
