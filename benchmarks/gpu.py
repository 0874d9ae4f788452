"""One-GPU benchmark of a ~1B-parameter Llama in bf16, lmfoundry and transformers side by side;
prints one JSON object (and progress lines on stderr). Within --budget seconds (default 300):

    training   tokens/s, MFU and peak memory for our loop plain, with --compile (per block) and
               with FSDP2 on one GPU (a 1-process group); transformers' LlamaForCausalLM + AdamW
               under the same bf16 autocast; TRL's DPOTrainer vs our DPO when trl imports
    inference  prefill and decode tokens/s at batch 1 and 32: ours in bf16 (eager and with the
               compiled static-cache decode step, CUDA graphs), transformers' generate in bf16

    python benchmarks/gpu.py                                  # cuda, preset 1b (Llama-3.2-1B shape)
    python benchmarks/gpu.py --device cpu --preset tiny       # the same code on CPU in seconds (a test runs it)

MFU = tokens/s x FLOPs per token / peak FLOP/s, FLOPs per token = 6 x (matrix weights, the output
layer included, the embedding lookup not) + 6 x seq_len x sum over layers of heads x head_dim
(attention scores and values, forward + backward); the peak comes from --peak-tflops or a
table of bf16 dense peaks by GPU name (null when unknown, e.g. on CPU). A section that would
overrun the budget is skipped and listed under "skipped".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.model import Transformer  # noqa: E402
from lmfoundry.quickstart.pipeline import flops_per_token  # noqa: E402

PRESETS = {
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
               rope_theta=500000.0, max_seq_len=4096),                     # Llama-3.2-1B's shape, 1.24B params
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                    "RTX 4090": 165.0, "A6000": 155.0}
FLOP_FORMULA = "6 * matrix_weights + 6 * seq_len * sum_layers(n_heads * head_dim)"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def peak_tflops(device, given):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Memory:
    """Peak memory of a section: CUDA's allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(cfg, n, batch, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


@contextlib.contextmanager
def one_process_group(device):
    """FSDP2 needs a process group: one process, on a free port."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- training

def train_ours(cfg, a, device, mode):
    from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
    torch.manual_seed(0)
    model = Transformer(cfg)
    tc = TrainConfig(steps=a.steps, lr=1e-4, schedule="constant", device=str(device), dtype="bf16", progress=False,
                     compile=mode == "compiled", fsdp=mode == "fsdp2", activation_checkpointing=a.ac)
    group = one_process_group(device) if mode == "fsdp2" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, group, Memory(device) as mem:
        train(model, ListBatches(batches(cfg, a.steps, a.batch, a.seq_len)), NextToken(), tc, Path(tmp) / "out")
        rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[a.warmup:]
    secs = sum(a.batch * a.seq_len / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": a.batch * a.seq_len * len(timed) / secs, "peak_memory_gib": mem.peak_gib,
            "losses": [round(r["loss"], 5) for r in rows]}


def hf_model(cfg, device, tmp):
    import transformers

    from lmfoundry.checkpoint import save_model
    torch.manual_seed(0)
    save_model(Transformer(cfg), Path(tmp) / "hf", format="llama")
    return transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32,
                                                             attn_implementation="sdpa").to(device)


def train_transformers(cfg, a, device):
    with tempfile.TemporaryDirectory() as tmp, Memory(device) as mem:
        model = hf_model(cfg, device, tmp).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        times, losses = [], []
        for b in batches(cfg, a.steps, a.batch, a.seq_len):
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(round(loss.item(), 5))
        del model, opt
    timed = times[a.warmup:]
    return {"tokens_per_s": a.batch * a.seq_len * len(timed) / sum(timed), "peak_memory_gib": mem.peak_gib,
            "losses": losses}


def dpo_side_by_side(cfg, a, device):
    """Our DPO objective vs TRL's DPOTrainer on the same token ids (steps/s), when trl imports."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not importable"}
    bench = Path(__file__).resolve().parent
    sys.path.insert(0, str(bench))
    import train as cpu_bench            # benchmarks/train.py: the same DPO comparison, parametrised
    args = argparse.Namespace(batch=a.batch, dpo_steps=a.steps, dpo_seq_len=min(a.seq_len, 512), dpo_len=40,
                              dpo_lr=1e-6, warmup=a.warmup, model=dict(cfg.__dict__), device=str(device))
    out = {}
    for name, fn in (("lmfoundry", cpu_bench.child_dpo_lmfoundry),
                     ("trl", lambda a_, t: cpu_bench.child_dpo_trl(a_, t, True))):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                out[name] = fn(args, tmp)
            except Exception as e:          # TRL's API moves between versions: report, do not fail
                out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


# ---------------------------------------------------------------- inference

def timed(fn, device, repeats=3):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inference(cfg, a, device, batch):
    from lmfoundry.generate import compile_decoding, generate
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (batch, a.prompt_len), generator=g).to(device)
    short = torch.randint(0, cfg.vocab_size, (batch, 16), generator=g).to(device)
    n = a.new_tokens
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device=device, dtype=torch.bfloat16).eval()
    out = {}
    with torch.inference_mode():
        t_pre = timed(lambda: ours(prompt, last_only=True), device)
        t_short = timed(lambda: ours(short, last_only=True), device)
    gen = lambda m: generate(m, short.tolist(), max_new_tokens=n, temperature=0.0, stop_ids=())  # noqa: E731
    out["lmfoundry"] = {"prefill_tok_s": batch * a.prompt_len / t_pre,
                        "decode_tok_s": batch * n / max(timed(lambda: gen(ours), device) - t_short, 1e-9)}
    if "compiled" in a.modes:
        compile_decoding(ours)
        t_gen = timed(lambda: gen(ours), device)
        out["lmfoundry_compiled"] = {"decode_tok_s": batch * n / max(t_gen - t_short, 1e-9),
                                     "fell_back": ours.compiled_decode is None}
    del ours
    if not a.skip_hf:
        with tempfile.TemporaryDirectory() as tmp:
            theirs = hf_model(cfg, device, tmp).to(torch.bfloat16).eval()
        with torch.inference_mode():
            t_pre = timed(lambda: theirs(prompt, logits_to_keep=1), device)
            t_short = timed(lambda: theirs(short, logits_to_keep=1), device)
            t_gen = timed(lambda: theirs.generate(short, attention_mask=torch.ones_like(short), do_sample=False,
                                                  max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                                  pad_token_id=0), device)
        out["transformers"] = {"prefill_tok_s": batch * a.prompt_len / t_pre,
                               "decode_tok_s": batch * n / max(t_gen - t_short, 1e-9)}
        del theirs
        for k in ("prefill_tok_s", "decode_tok_s"):
            out[f"ratio_{k}"] = out["lmfoundry"][k] / out["transformers"][k]
    return out


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="1b", help="1b (Llama-3.2-1B's shape) or any lmfoundry preset (tiny ...)")
    ap.add_argument("--batch", type=int, default=4, help="training rows per step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="training steps left out of the timing")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--modes", default="plain,compiled,fsdp2", help="training runs of ours")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-batches", default="1,32")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers / TRL side")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the device")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; sections that would overrun are skipped")
    a = ap.parse_args()
    a.modes = [m for m in a.modes.split(",") if m]
    device = torch.device(a.device)
    cfg = ModelConfig(**PRESETS[a.preset]) if a.preset in PRESETS else ModelConfig.from_preset(a.preset)
    t_start = time.perf_counter()
    fpt = flops_per_token(cfg, a.seq_len)
    peak = peak_tflops(device, a.peak_tflops)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": a.preset, "params": cfg.num_params(), "dtype": "bf16",
              "batch": a.batch, "seq_len": a.seq_len, "flops_per_token": fpt, "flop_formula": FLOP_FORMULA,
              "peak_tflops": peak, "training": {}, "inference": {}, "skipped": []}
    log(f"{result['device']}: {a.preset} ({cfg.num_params() / 1e9:.2f}B params), FLOPs/token = {FLOP_FORMULA} = "
        f"{fpt:.3e}; peak {peak} TFLOP/s")

    def section(name, fn, share):
        """Run fn unless the remaining budget is below `share` of the total (a rough cost guess)."""
        left = a.budget - (time.perf_counter() - t_start)
        if left < share * a.budget:
            result["skipped"].append(name)
            log(f"skip {name}: {left:.0f}s left")
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:   # one failing section (an OOM, a missing library) must not lose the others
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        log(f"{name}: {time.perf_counter() - t0:.0f}s {json.dumps(out)[:300]}")
        return out

    runs = {m: lambda m=m: train_ours(cfg, a, device, m) for m in a.modes}
    if not a.skip_hf:
        runs["transformers"] = lambda: train_transformers(cfg, a, device)
    for name, fn in runs.items():
        r = section(f"train {name}", fn, 0.15)
        if r is not None:
            if peak and "tokens_per_s" in r:
                r["mfu"] = r["tokens_per_s"] * fpt / (peak * 1e12)
            result["training"][name] = r
    for b in [int(x) for x in a.decode_batches.split(",") if x]:
        r = section(f"inference batch {b}", lambda b=b: inference(cfg, a, device, b), 0.08)
        if r is not None:
            result["inference"][f"batch_{b}"] = r
    if not a.skip_hf:
        r = section("dpo", lambda: dpo_side_by_side(cfg, a, device), 0.1)
        if r is not None:
            result["dpo"] = r
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
