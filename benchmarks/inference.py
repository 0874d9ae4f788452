"""Prefill and decode throughput: lmfoundry vs transformers on the same checkpoint, one run.

    .venv/bin/python benchmarks/inference.py                  # ~125M Llama, fp32, CPU
    .venv/bin/python benchmarks/inference.py --device cuda --dtype bfloat16 --batch 1 8 32

Prefill: one forward over a batch of prompts returning next-token logits (transformers with
logits_to_keep=1, so neither side computes logits it does not need). Decode: greedy
generation of --new-tokens tokens after a short prompt, every token forced (no eos stop);
the prefill of that short prompt is timed separately and subtracted. Each figure is the
median of --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.checkpoint import load_model, save_model  # noqa: E402
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.generate import generate  # noqa: E402
from lmfoundry.model import Transformer  # noqa: E402


def timed(fn, repeats, sync):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    cfg = ModelConfig.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_model(Transformer(cfg), Path(tmp) / "m")
        ours = load_model(Path(tmp) / "m", dtype=dtype, device=args.device)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=dtype).to(args.device).eval()
    print(f"model: {args.preset} ({cfg.num_params() / 1e6:.0f}M params), {args.dtype}, {args.device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"{'measure':<28}{'lmfoundry':>14}{'transformers':>14}{'ratio':>8}")
    rows = []
    g = torch.Generator().manual_seed(0)
    for B in args.batch:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).to(args.device)
        short = torch.randint(0, cfg.vocab_size, (B, 16), generator=g).to(args.device)
        with torch.inference_mode():
            t_ours = timed(lambda: ours(prompt, last_only=True), args.repeats, sync)
            t_theirs = timed(lambda: theirs(prompt, logits_to_keep=1), args.repeats, sync)
            pre_ours = timed(lambda: ours(short, last_only=True), args.repeats, sync)
            pre_theirs = timed(lambda: theirs(short, logits_to_keep=1), args.repeats, sync)
        rows.append((f"prefill tok/s  batch {B}", B * args.prompt_len / t_ours, B * args.prompt_len / t_theirs))

        n = args.new_tokens
        prompts = short.tolist()
        gen_ours = timed(lambda: generate(ours, prompts, max_new_tokens=n, temperature=0.0, stop_ids=()),
                         args.repeats, sync)
        gen_theirs = timed(lambda: theirs.generate(short, attention_mask=torch.ones_like(short), do_sample=False,
                                                   max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                                   pad_token_id=0), args.repeats, sync)
        rows.append((f"decode tok/s   batch {B}", B * n / max(gen_ours - pre_ours, 1e-9),
                     B * n / max(gen_theirs - pre_theirs, 1e-9)))
        for name, a, b in rows[-2:]:
            print(f"{name:<28}{a:>14.1f}{b:>14.1f}{a / b:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
