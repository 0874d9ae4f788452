"""Training throughput and peak memory: lmfoundry vs what users would otherwise write or run.

    .venv/bin/python benchmarks/train.py                       # CPU, fp32, ~10M-parameter Llama
    PYTHONPATH=/path/to/trl_pkgs .venv/bin/python benchmarks/train.py   # also DPO vs TRL's DPOTrainer
    .venv/bin/python benchmarks/train.py --speed --skip-dpo    # bf16 vs fp32 vs transformers, 102,400 vocab RSS

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

3. With --speed (instead of 1 and 2): on a larger config (SPEED_MODEL, ~50M params, where matrix products dominate)
   our fp32 vs our bf16 autocast vs transformers under the same bf16 autocast (fp32 master
   weights and AdamW on every side), runs interleaved; and the peak RSS of training steps with
   a 102,400-token vocabulary (EXAONE's) with today's chunked loss vs the full-logits loss it
   replaced (F.cross_entropy on [B, T, V] fp32 logits).

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
SPEED_MODEL = dict(vocab_size=32000, dim=768, n_layers=4, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=1024)
VOCAB_MODEL = dict(vocab_size=102400, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=1024)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(seed=0, shape=None):
    from lmfoundry.config import ModelConfig
    from lmfoundry.model import Transformer
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**(shape or MODEL)))


def token_batches(n, batch, seq_len, vocab=MODEL["vocab_size"]):
    """Random token rows; both sides read seq_len tokens and predict tokens 1..seq_len-1."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq_len), generator=g) for _ in range(n)]


class FullLogitsNextToken:
    """The loss before chunking (token_logps as it was): [B, T, V] logits, F.cross_entropy in fp32."""

    name = "next_token"

    def count(self, batch):
        return (batch["labels"] != -100).sum()

    def tokens(self, batch):
        return batch["input_ids"].numel()

    def __call__(self, model, batch):
        import torch.nn.functional as F
        logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               reduction="sum"), {}


# ---------------------------------------------------------------- children (one measurement each)

def child_lmfoundry(a, tmp, dtype="float32", shape=None, objective=None):
    from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
    shape = shape or MODEL
    batches = [{"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)}
               for ids in token_batches(a.steps, a.batch, a.seq_len, shape["vocab_size"])]
    cfg = TrainConfig(steps=a.steps, lr=a.lr, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999), clip=1.0,
                      progress=False, device="cpu", dtype=dtype)
    train(make_model(shape=shape), ListBatches(batches), objective or NextToken(), cfg, Path(tmp) / "out")
    rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[a.warmup:]
    step_tokens = a.batch * a.seq_len
    secs = sum(step_tokens / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": step_tokens * len(timed) / secs, "losses": [r["loss"] for r in rows]}


def child_transformers(a, tmp, amp=None, shape=None):
    import contextlib

    import transformers

    from lmfoundry.checkpoint import save_model
    shape = shape or MODEL
    save_model(make_model(shape=shape), Path(tmp) / "hf", format="llama")
    model = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), weight_decay=0.0)
    times, losses = [], []
    for ids in token_batches(a.steps, a.batch, a.seq_len, shape["vocab_size"]):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss   # transformers shifts the labels inside
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
    device = getattr(a, "device", "cpu")                  # benchmarks/gpu.py: its device and model, bf16
    cfg = TrainConfig(steps=a.dpo_steps, lr=a.dpo_lr, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999),
                      clip=1.0, progress=False, device=device, dtype="float32" if device == "cpu" else "bf16")
    t0 = time.perf_counter()
    train(make_model(shape=getattr(a, "model", None)), ListBatches([batch]), DPO(beta=0.1), cfg, Path(tmp) / "out")
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
    save_model(make_model(shape=getattr(a, "model", None)), hf_dir, format="llama", tokenizer_from=tok_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                                              attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    # Hand TRL our token ids as they are (its own chat-template tokenisation would differ in
    # details such as the newline after <|im_end|>): skip its dataset preparation.
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kw: dataset
    args = DPOConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=a.batch, max_steps=a.dpo_steps,
                     learning_rate=a.dpo_lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
                     beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=getattr(a, "device", "cpu") == "cpu", bf16=getattr(a, "device", "cpu") != "cpu",
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
            "dpo-trl-precompute": lambda a, t: child_dpo_trl(a, t, True),
            "speed-fp32": lambda a, t: child_lmfoundry(a, t, "float32", SPEED_MODEL),
            "speed-bf16": lambda a, t: child_lmfoundry(a, t, "bf16", SPEED_MODEL),
            "speed-transformers-bf16": lambda a, t: child_transformers(a, t, torch.bfloat16, SPEED_MODEL),
            "vocab-chunked": lambda a, t: child_steps(a, None),
            "vocab-full-logits": lambda a, t: child_steps(a, FullLogitsNextToken())}


def child_steps(a, objective):
    """Training steps alone (forward, backward, clip, AdamW; no checkpoint or export around them) on
    the 102,400-token vocabulary: the peak RSS they reach."""
    from lmfoundry.train import NextToken
    objective = objective or NextToken()
    model = make_model(shape=VOCAB_MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    times, losses = [], []
    for ids in token_batches(a.steps, a.batch, a.seq_len, VOCAB_MODEL["vocab_size"]):
        batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)}
        t0 = time.perf_counter()
        loss = objective(model, batch)[0] / objective.count(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[a.warmup:] or times
    return {"tokens_per_s": a.batch * a.seq_len * len(timed) / sum(timed), "losses": losses}


def speed(a, argv):
    """bf16 vs fp32 vs transformers bf16 (interleaved rounds, best round each), then the vocabulary RSS."""
    from lmfoundry.config import ModelConfig
    from lmfoundry.quantize import native_bf16
    print(f"\nbf16 training: Llama {ModelConfig(**SPEED_MODEL).num_params() / 1e6:.0f}M ({SPEED_MODEL}); "
          f"batch {a.batch} x seq {a.seq_len}, {a.steps} steps ({a.warmup} untimed); bf16 units: "
          f"{native_bf16('cpu')[1]}; load average before: {os.getloadavg()[0]:.1f}")
    names = ("speed-fp32", "speed-bf16", "speed-transformers-bf16")
    best: dict[str, dict] = {n: {"error": "not run (--rounds 0)"} for n in names}
    for round_ in range(a.rounds):
        for name in names:
            r = run_child(name, argv)
            if "error" in best[name] or r.get("tokens_per_s", 0) > best[name]["tokens_per_s"]:
                best[name] = r
            print(f"  round {round_ + 1} {name:<26} {r.get('tokens_per_s', 0):>8,.0f} tok/s {r.get('error', '')}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    f32, b16, hf = (best[n].get("tokens_per_s", float("nan")) for n in names)
    if a.rounds:
        print(f"  best: lmfoundry fp32 {f32:,.0f}, bf16 {b16:,.0f}, transformers bf16 {hf:,.0f} tok/s; "
              f"bf16 / fp32 {b16 / f32:.2f}x, bf16 / transformers bf16 {b16 / hf:.2f}x")
    print(f"\npeak RSS of training steps, vocabulary 102,400 ({VOCAB_MODEL}), batch {a.batch} x seq {a.seq_len}")
    chunked, full = run_child("vocab-chunked", argv), run_child("vocab-full-logits", argv)
    for name, r in (("chunked loss (now)", chunked), ("full logits (before)", full)):
        print(f"  {name:<22} {r.get('peak_rss_mb', 0):>8,.0f} MB   {r.get('tokens_per_s', 0):>8,.0f} tok/s "
              f"{r.get('error', '')}")
    if "error" not in chunked and "error" not in full:
        print(f"  ratio chunked / full logits: {chunked['peak_rss_mb'] / full['peak_rss_mb']:.2f}x peak RSS, "
              f"{chunked['tokens_per_s'] / full['tokens_per_s']:.2f}x tokens/s; first losses "
              f"{chunked['losses'][0]:.6f} vs {full['losses'][0]:.6f}")


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
    ap.add_argument("--speed", action="store_true", help="also bf16 vs fp32 vs transformers bf16, and vocab RSS")
    ap.add_argument("--rounds", type=int, default=2, help="--speed: interleaved rounds (best of each kept)")
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
    if a.speed:
        return speed(a, argv)
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
