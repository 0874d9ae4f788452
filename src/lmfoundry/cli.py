"""`lmfoundry <verb>`: thin functions over the library.

User errors (LMFoundryError) are caught once, here, and printed as one line on stderr with
exit code 1; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import LMFoundryError


def _model_arg(p):
    p.add_argument("model", help="a Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps ...")


def _sampling_args(p, max_new_tokens=128, temperature=0.0):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args):
    from .generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop_strings=tuple(args.stop))


def _load(args):
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    return model, load_tokenizer(args.model)


def _stream(model, tokenizer, prompt_ids, params, out=sys.stdout):
    """Generate for one prompt, writing text as it is finalised; returns (Completion, seconds)."""
    from .generate import generate
    decoder = tokenizer.stream_decoder()

    def on_token(row, token_id):
        out.write(decoder.push(token_id))
        out.flush()

    t0 = time.perf_counter()
    (completion,) = generate(model, [prompt_ids], params, on_token=on_token, tokenizer=tokenizer)
    out.write(decoder.flush())
    out.flush()
    return completion, time.perf_counter() - t0


def cmd_generate(args):
    model, tok = _load(args)
    params = _sampling(args)
    for k, prompt in enumerate(args.prompt):
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
        else:
            ids = tok.encode(prompt)
        if not args.chat:
            sys.stdout.write(prompt)
        completion, secs = _stream(model, tok, ids, params)
        n = len(completion.tokens)
        print()
        print(f"[{n} tokens in {secs:.2f}s, {n / max(secs, 1e-9):.1f} tok/s, finish: {completion.finish_reason}]",
              file=sys.stderr)


def cmd_chat(args):
    from .errors import GenerationError
    model, tok = _load(args)
    params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("chat with", args.model, "- /reset clears the conversation, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        while True:
            ids = tok.apply_chat_template(system + history, add_generation_prompt=True, tokenize=True)
            if len(ids) + params.max_new_tokens <= model.config.max_seq_len or len(history) <= 1:
                break
            history = history[2:]   # forget the oldest exchange to stay inside the context
            print("[context full: dropped the oldest exchange]", file=sys.stderr)
        try:
            completion, _ = _stream(model, tok, ids, params)
        except GenerationError as e:
            print(f"\nlmfoundry: error: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": tok.decode(completion.tokens)})


def cmd_convert(args):
    from .checkpoint import convert
    t0 = time.perf_counter()
    out = convert(args.src, args.dst, to=args.to, dtype=None if args.dtype == "auto" else args.dtype,
                  max_shard_size=args.max_shard_size, overwrite=args.force)
    print(f"wrote {out} ({args.to}) in {time.perf_counter() - t0:.1f}s")


def cmd_info(args):
    from .checkpoint import read_config
    from .config import PRESETS, ModelConfig
    if args.model in PRESETS and not Path(args.model).exists():
        cfg, fmt = ModelConfig.from_preset(args.model), "preset"
    else:
        cfg, f = read_config(args.model)
        fmt = f.architecture
    per_layer = lambda xs: str(xs[0]) if len(set(xs)) == 1 else f"{xs[0]}..{xs[-1]} (per layer)"  # noqa: E731
    rows = [("source", fmt), ("parameters", f"{cfg.num_params():,}"), ("layers", cfg.n_layers), ("dim", cfg.dim),
            ("heads / kv heads", f"{per_layer(cfg.n_heads)} / {per_layer(cfg.n_kv_heads)}"),
            ("head_dim", cfg.head_dim), ("ffn", per_layer(cfg.ffn_dim)), ("vocab", cfg.vocab_size),
            ("context", cfg.max_seq_len), ("rope", f"theta={cfg.rope_theta:g} scaling={cfg.rope_scaling}"),
            ("tied embeddings", cfg.tie_embeddings), ("q/k norm", cfg.qk_norm),
            ("sliding window", cfg.sliding_window), ("skip connections", (cfg.skip_save, cfg.skip_blend,
                                                                          cfg.skip_weights) if cfg.has_skips else None)]
    for k, v in rows:
        print(f"{k:>18}  {v}")


def cmd_presets(args):
    from .config import PRESETS, ModelConfig
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        print(f"{name:<18} {cfg.num_params():>16,}  layers={cfg.n_layers:<3} dim={cfg.dim}")


def cmd_quickstart(args):
    """Until the full recipe lands: build a tiny model with a trained tokenizer, save it as a
    Hugging Face directory, load it back, check KV-cache decoding against a full forward, and
    generate. The weights are random, so the text is noise; the pipeline is real."""
    import torch

    from .checkpoint import load_model
    from .demo import make_demo_checkpoint
    from .generate import generate
    from .tokenizer import load_tokenizer
    out = Path(args.out)
    t0 = time.perf_counter()
    path = make_demo_checkpoint(out / "tiny", preset=args.preset, overwrite=True)
    model, tok = load_model(path), load_tokenizer(path)
    print(f"[1/3] wrote {path}: {model.config.num_params():,}-parameter {model.source_format} model, "
          f"{tok.vocab_size}-token byte-level BPE, chat template ({time.perf_counter() - t0:.1f}s)")
    prompt = tok.apply_chat_template([{"role": "user", "content": "How many apples does Tom have?"}],
                                     add_generation_prompt=True, tokenize=True)
    (c,) = generate(model, [prompt], max_new_tokens=24, temperature=0.0, stop_ids=())
    with torch.inference_mode():
        full = model(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1:-1].argmax(-1).tolist()
    status = "identical" if full == c.tokens else "DIFFERENT"
    print(f"[2/3] KV-cache greedy decoding vs full forward: {status} over {len(c.tokens)} tokens")
    print(f"[3/3] chat generation (random weights, so noise): {tok.decode(c.tokens)!r}")
    print(f"done in {time.perf_counter() - t0:.1f}s. Try: lmfoundry chat {path}")
    if full != c.tokens:
        raise LMFoundryError("KV-cache decoding disagreed with the full forward")


def cmd_upscale(args):
    from .scale.upscale import upscale
    t0 = time.perf_counter()
    result = upscale(args.src, args.out, drop=args.drop, layers=args.layers, target_layers=args.target_layers,
                     seam=args.seam, seam_width=args.seam_width, expand=args.expand,
                     dtype=None if args.dtype == "auto" else args.dtype, max_shard_size=args.max_shard_size,
                     dry_run=args.dry_run, overwrite=args.force, progress=True)
    if args.dry_run:
        print(result.describe())
    print(f"{result.summary()} in {time.perf_counter() - t0:.1f}s")


def build_parser():
    p = argparse.ArgumentParser(prog="lmfoundry", description="Build, grow, train, merge, evaluate and serve "
                                "Llama-family models as plain Hugging Face checkpoints.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    g = sub.add_parser("generate", help="continue one or more prompts")
    _model_arg(g)
    g.add_argument("prompt", nargs="+")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    _sampling_args(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal, streaming")
    _model_arg(c)
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c, max_new_tokens=256, temperature=0.7)
    c.set_defaults(fn=cmd_chat)

    v = sub.add_parser("convert", help="rewrite a checkpoint in another architecture's format")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--to", required=True, choices=["llama", "mistral", "solar", "exaone", "openelm"])
    v.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (keep)")
    v.add_argument("--max-shard-size", default="5GB")
    v.add_argument("--force", action="store_true", help="replace DST if it exists")
    v.set_defaults(fn=cmd_convert)

    u = sub.add_parser("upscale", help="Depth Up-Scaling (SOLAR) and block expansion (LLaMA-Pro), streamed")
    u.add_argument("src", help="a Hugging Face checkpoint directory")
    u.add_argument("out", help="where to write the upscaled checkpoint (same format as SRC)")
    u.add_argument("--drop", metavar="M", help="SOLAR DUS: keep layers [0, n-M) of one copy and [M, n) of "
                   "another, 2(n-M) layers (n=32, M=8 -> 48)")
    u.add_argument("--layers", metavar="SLICES", help="half-open source slices to stack, e.g. 0:24,8:32")
    u.add_argument("--target-layers", metavar="S", help="SOLAR DUS to S layers (M = n - S/2)")
    u.add_argument("--seam", default="stack", help="stack (default) or average: around each seam, average the "
                   "two copies' layers at the same position")
    u.add_argument("--seam-width", default=1, metavar="K", help="layers averaged on each side of a seam (1)")
    u.add_argument("--expand", metavar="P", help="then add P identity blocks, one after every n/P layers (LLaMA-Pro)")
    u.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (keep)")
    u.add_argument("--max-shard-size", default="5GB")
    u.add_argument("--dry-run", action="store_true", help="print the plan, sizes and peak memory; write nothing")
    u.add_argument("--force", action="store_true", help="replace OUT if it exists")
    u.set_defaults(fn=cmd_upscale)

    i = sub.add_parser("info", help="describe a checkpoint directory or a preset")
    i.add_argument("model")
    i.set_defaults(fn=cmd_info)

    sub.add_parser("presets", help="list model presets and their parameter counts").set_defaults(fn=cmd_presets)

    q = sub.add_parser("quickstart", help="the main job on embedded defaults")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--preset", default="tiny")
    q.set_defaults(fn=cmd_quickstart)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LMFoundryError as e:
        if args.debug:
            raise
        print(f"lmfoundry: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
