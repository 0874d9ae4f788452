"""Prefill and decode throughput: lmfoundry vs transformers on the same checkpoint, one run.

    .venv/bin/python benchmarks/inference.py                  # ~125M Llama, fp32, CPU
    .venv/bin/python benchmarks/inference.py --variants fp32,bf16,int8,hf-fp32,hf-bf16 --batch 1
    .venv/bin/python benchmarks/inference.py --device cuda --variants bf16,hf-bf16 --batch 1 8 32

Variants: ours in fp32 / bf16 / int8 (int8 weight-only linears, bf16 activations: lmfoundry.quantize)
/ bf16-compiled (compile_decoding: one compiled decode step over a static KV cache), and
transformers in fp32 / bf16 (hf-fp32, hf-bf16). Prefill: one forward over a batch of prompts
returning next-token logits (transformers with logits_to_keep=1, so neither side computes logits
it does not need). Decode: greedy generation of --new-tokens tokens after a short prompt, every
token forced (no eos stop); the prefill of that short prompt is timed separately and subtracted.
Every variant is timed once per round, rounds interleaved (the machine may be shared); each
figure is the median over --repeats rounds after one warm-up. Ratios against our fp32 and
against transformers in the same dtype are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.checkpoint import save_model  # noqa: E402
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.generate import compile_decoding, generate  # noqa: E402
from lmfoundry.model import Transformer  # noqa: E402
from lmfoundry.quantize import load_for_inference, native_bf16  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load(variant, path, device):
    """(model, is_ours) for a variant name."""
    if variant.startswith("hf-"):
        import transformers
        dtype = DTYPES[variant[3:]]
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), False
    if variant == "int8":
        return load_for_inference(path, quantize_method="int8", device=device), True
    model = load_for_inference(path, dtype=variant.removesuffix("-compiled"), device=device)
    if variant.endswith("-compiled"):
        compile_decoding(model)
    return model, True


def once(fn, sync):
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--variants", default="fp32,hf-fp32", help="comma-separated: fp32, bf16, int8, bf16-compiled, "
                    "fp32-compiled, hf-fp32, hf-bf16")
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
    variants = [v for v in args.variants.split(",") if v]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    cfg = ModelConfig.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_model(Transformer(cfg), Path(tmp) / "m")
        models = {v: load(v, Path(tmp) / "m", args.device) for v in variants}
    print(f"model: {args.preset} ({cfg.num_params() / 1e6:.0f}M params), {args.device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}, bf16 units: "
          f"{native_bf16(args.device)[1]}, load average {os.getloadavg()[0]:.1f}")
    g = torch.Generator().manual_seed(0)
    for B in args.batch:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).to(args.device)
        short = torch.randint(0, cfg.vocab_size, (B, 16), generator=g).to(args.device)
        n = args.new_tokens

        def jobs(model, ours):
            fwd = (lambda x: model(x, last_only=True)) if ours else (lambda x: model(x, logits_to_keep=1))
            if ours:
                gen = lambda: generate(model, short.tolist(), max_new_tokens=n, temperature=0.0, stop_ids=())  # noqa
            else:
                gen = lambda: model.generate(short, attention_mask=torch.ones_like(short), do_sample=False,  # noqa
                                             max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            return {"prefill": lambda: fwd(prompt), "short": lambda: fwd(short), "gen": gen}

        times = {v: {k: [] for k in ("prefill", "short", "gen")} for v in variants}
        with torch.inference_mode():
            for r in range(args.repeats + 1):          # round 0 warms up (and compiles)
                for v in variants:
                    for k, fn in jobs(*models[v]).items():
                        t = once(fn, sync)
                        if r:
                            times[v][k].append(t)
        med = {v: {k: statistics.median(ts) for k, ts in t.items()} for v, t in times.items()}
        rows = {v: (B * args.prompt_len / m["prefill"], B * n / max(m["gen"] - m["short"], 1e-9))
                for v, m in med.items()}
        print(f"\nbatch {B}: prompt {args.prompt_len} tokens, {n} decoded tokens; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"  {'variant':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'vs our fp32':>14}{'vs hf same dtype':>18}")
        for v, (pre, dec) in rows.items():
            base = rows.get("fp32")
            same = rows.get("hf-" + ("bf16" if v == "int8" else v.removesuffix("-compiled")))
            vs_ours = f"{pre / base[0]:.2f}/{dec / base[1]:.2f}x" if base and not v.startswith("hf-") else ""
            vs_hf = f"{pre / same[0]:.2f}/{dec / same[1]:.2f}x" if same and not v.startswith("hf-") else ""
            print(f"  {v:<16}{pre:>15.1f}{dec:>14.1f}{vs_ours:>14}{vs_hf:>18}", flush=True)
    print("\n(ratios: prefill/decode; int8 is compared with transformers in bf16, its activation dtype)")


if __name__ == "__main__":
    main()
