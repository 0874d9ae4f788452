"""Serving throughput: `lmfoundry serve` under 1, 4 and 16 concurrent clients, against the
same workload run one request at a time through transformers' `generate`, in one run.

    .venv/bin/python benchmarks/serve.py                         # llama-100m, fp32, CPU
    .venv/bin/python benchmarks/serve.py --preset tiny --requests 64 --max-tokens 128

The model is the `--preset` shape with random weights (seed 0), saved with
lmfoundry.checkpoint.save_model next to the demo byte-level BPE tokenizer (512 tokens, which
fits every preset's vocabulary). Every request is a different text prompt from the demo corpus
(~30-90 tokens) asking for exactly --max-tokens greedy tokens (ignore_eos on the server,
eos_token_id=None on transformers), so every configuration generates the same tokens.

The server runs in a subprocess with --max-batch 16; clients are threads using the official
`openai` client (non-streaming /v1/completions). Reported per configuration: aggregate
generated tokens/s (all tokens / wall time), p50/p95 request latency, the server's mean decode
batch size (from /metrics), and how many greedy token sequences equal transformers'.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.checkpoint import load_model, save_model  # noqa: E402
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.demo import CORPUS, make_demo_checkpoint  # noqa: E402
from lmfoundry.model import Transformer  # noqa: E402
from lmfoundry.tokenizer import load_tokenizer  # noqa: E402


def build_checkpoint(tmp: Path, preset: str) -> Path:
    demo = make_demo_checkpoint(tmp / "demo")            # tokenizer files + special token ids
    ids = load_model(demo).config
    cfg = ModelConfig.from_preset(preset).replace(bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                                                  pad_token_id=ids.pad_token_id)
    if load_tokenizer(demo).vocab_size > cfg.vocab_size:
        raise SystemExit(f"preset {preset} has a smaller vocabulary than the demo tokenizer")
    torch.manual_seed(0)
    return save_model(Transformer(cfg), tmp / preset, tokenizer_from=demo)


def make_prompts(n: int) -> list[str]:
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    return [f"Request {i}: " + " ".join(lines[(i + k) % len(lines)] for k in range(1 + i % 2)) for i in range(n)]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def metric(url: str, name: str) -> float:
    import urllib.request
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def run_server_configs(path, prompts, args):
    import openai
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen([sys.executable, "-m", "lmfoundry", "serve", str(path), "--port", str(port),
                             "--max-batch", str(max(args.concurrency)), "--max-queue", str(len(prompts)),
                             "--served-model-name", "bench", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    try:
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)

        def one(prompt):
            t0 = time.perf_counter()
            r = client.completions.create(model="bench", prompt=prompt, max_tokens=args.max_tokens, temperature=0,
                                          logprobs=0, extra_body={"ignore_eos": True,
                                                                  "return_tokens_as_token_ids": True})
            toks = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
            return time.perf_counter() - t0, r.usage.completion_tokens, toks

        one(prompts[0])   # warm-up
        results = {}
        for c in args.concurrency:
            steps0, rows0 = metric(url, "lmfoundry_decode_steps_total"), metric(url, "lmfoundry_decode_rows_total")
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                out = list(pool.map(one, prompts))
            wall = time.perf_counter() - t0
            steps = metric(url, "lmfoundry_decode_steps_total") - steps0
            rows = metric(url, "lmfoundry_decode_rows_total") - rows0
            results[c] = dict(wall=wall, tokens=sum(o[1] for o in out), lat=[o[0] for o in out],
                              seqs=[o[2] for o in out], batch=rows / max(steps, 1))
            r = results[c]
            print(f"  server, {c:>2} clients: {r['tokens'] / wall:8.1f} tok/s  (mean decode batch {r['batch']:.1f})",
                  flush=True)
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_transformers(path, prompts, tok, args):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = args.max_tokens
    lat, seqs = [], []

    def gen(ids):
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, eos_token_id=None, pad_token_id=0)   # no eos: like ignore_eos
        return y[0, len(ids):].tolist()

    gen(tok.encode(prompts[0]))   # warm-up
    t0 = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        seqs.append(gen(tok.encode(p)))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return dict(wall=wall, tokens=n * len(prompts), lat=lat, seqs=seqs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--requests", type=int, default=16, help="requests per configuration (the same prompts)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=None, help="torch threads for server and transformers "
                    "(default: torch's own choice)")
    args = ap.parse_args()
    import transformers
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = make_prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp), args.preset)
        tok = load_tokenizer(path)
        cfg = ModelConfig.from_preset(args.preset)
        lens = [len(tok.encode(p)) for p in prompts]
        print(f"model: {args.preset} ({cfg.num_params() / 1e6:.0f}M params, random weights), fp32, CPU, "
              f"{os.cpu_count()} cores, threads {args.threads or torch.get_num_threads()}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}")
        print(f"workload: {len(prompts)} requests, prompts {min(lens)}-{max(lens)} tokens, "
              f"{args.max_tokens} greedy tokens each", flush=True)
        server = run_server_configs(path, prompts, args)
        print("  transformers generate, one request at a time ...", flush=True)
        hf = run_transformers(path, prompts, tok, args)

    base = server[args.concurrency[0]]
    base_tps, hf_tps = base["tokens"] / base["wall"], hf["tokens"] / hf["wall"]
    print()
    print(f"{'configuration':<34}{'tok/s':>9}{'vs 1 client':>13}{'vs HF seq':>11}{'p50 s':>8}{'p95 s':>8}"
          f"{'greedy = HF':>13}")
    rows = [(f"lmfoundry serve, {c} client{'s' if c > 1 else ''}", server[c]) for c in args.concurrency]
    rows.append(("transformers generate, sequential", hf))
    for name, r in rows:
        tps = r["tokens"] / r["wall"]
        same = sum(a == b for a, b in zip(r["seqs"], hf["seqs"]))
        print(f"{name:<34}{tps:>9.1f}{tps / base_tps:>12.2f}x{tps / hf_tps:>10.2f}x"
              f"{statistics.median(r['lat']):>8.2f}{pct(r['lat'], 0.95):>8.2f}{same:>9}/{len(prompts)}")


if __name__ == "__main__":
    main()
