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
    p.add_argument("model", help="a Hugging Face checkpoint directory or a GGUF file")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's; "
                   "bfloat16 with --quantize)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="int8 weight-only linear layers "
                   "(per-channel symmetric; activations in --dtype)")
    p.add_argument("--compile", action="store_true", help="decode with one compiled step over a static KV cache "
                   "(CUDA graphs on GPU); falls back to eager with a warning if the compiler fails")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps ...")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT LoRA adapter folded into the weights")


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
    from .quantize import load_for_inference
    from .tokenizer import load_tokenizer
    model = load_for_inference(args.model, dtype=args.dtype, quantize_method=args.quantize, device=args.device,
                               compile=args.compile, adapter=args.adapter)
    return model, load_tokenizer(args.model)


def _stream(model, tokenizer, prompt_ids, params, out=None):
    """Generate for one prompt, writing text as it is finalised; returns (Completion, seconds)."""
    from .generate import generate
    out = out or sys.stdout
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
    from .checkpoint.gguf import export_gguf, import_gguf, is_gguf
    t0 = time.perf_counter()
    dtype = None if args.dtype == "auto" else args.dtype
    to = args.to or ("gguf" if is_gguf(args.dst) else None if is_gguf(args.src) else "")
    if to == "":
        raise LMFoundryError("give --to (llama, mistral, solar, exaone, openelm or gguf)")
    if to == "gguf":
        out = export_gguf(args.src, args.dst, quant=args.quant, overwrite=args.force)
    elif is_gguf(args.src):
        out = import_gguf(args.src, args.dst, to=to, dtype=dtype, max_shard_size=args.max_shard_size,
                          overwrite=args.force)
    else:
        out = convert(args.src, args.dst, to=to, dtype=dtype, max_shard_size=args.max_shard_size, overwrite=args.force)
    print(f"wrote {out} ({to or 'format of the GGUF'}) in {time.perf_counter() - t0:.1f}s")


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


def cmd_plot(args):
    from .plots import plot_runs
    for path in plot_runs(args.runs, args.out, x=args.x):
        print(f"wrote {path}")


def cmd_presets(args):
    from .config import PRESETS, ModelConfig
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        print(f"{name:<18} {cfg.num_params():>16,}  layers={cfg.n_layers:<3} dim={cfg.dim}")


def cmd_quickstart(args):
    from .quickstart.pipeline import run
    run(args.out, fast=args.fast, force=args.force, seed=args.seed, threads=args.threads)


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


def cmd_merge(args):
    from .scale.merge import merge
    t0 = time.perf_counter()
    result = merge(args.recipe, args.out, dry_run=args.dry_run, overwrite=args.force, seed=args.random_seed,
                   max_shard_size=args.max_shard_size, progress=not args.dry_run)
    if args.dry_run:
        print(result.describe())
        print("dry run: nothing written")
    else:
        print(f"wrote {result} in {time.perf_counter() - t0:.1f}s")


def cmd_tokenizer_train(args):
    from .tokenizer_train import DEFAULT_SPECIAL_TOKENS, train_tokenizer
    t0 = time.perf_counter()
    out = train_tokenizer(args.files, args.out, args.vocab_size, [*DEFAULT_SPECIAL_TOKENS, *args.special_token],
                          text_field=args.text_field, overwrite=args.force, progress=True)
    from .tokenizer import load_tokenizer
    print(f"wrote {out} ({load_tokenizer(out).vocab_size:,} tokens) in {time.perf_counter() - t0:.1f}s")


def cmd_tokenizer_report(args):
    from .tokenizer_train import compression_report, format_report
    print(format_report(compression_report(args.tokenizer, args.files, text_field=args.text_field)))


def cmd_tokenize(args):
    import os

    from .data import tokenize_corpus
    t0 = time.perf_counter()
    workers = args.workers or os.cpu_count() or 1
    ds = tokenize_corpus(args.files, args.tokenizer, args.out, text_field=args.text_field, workers=workers,
                         txt_mode=args.txt_mode)
    what = "reused (inputs unchanged)" if ds.reused else f"written in {time.perf_counter() - t0:.1f}s"
    print(f"{ds.path}: {len(ds):,} documents, {ds.num_tokens:,} tokens ({ds.dtype.name}), {what}")


def cmd_train(args):
    """pretrain | sft | dpo: also under `torchrun --nproc_per_node N -m lmfoundry ...`."""
    from .train.recipe import run
    from .train.settings import resolve
    flags = {k: v for k, v in vars(args).items() if k not in ("fn", "verb", "verb_name", "debug", "config")}
    run(args.verb_name, resolve(args.verb_name, flags, args.config))


def _eval_lm(args):
    from .eval import LM
    return LM.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile,
                   adapter=args.adapter, batch_size=args.batch_size, max_length=getattr(args, "max_length", None),
                   share_prefix=not getattr(args, "no_share_prefix", False))


def _write_json(path, obj):
    import json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def cmd_eval(args):
    """Benchmarks on local files in the datasets' own schemas (lm-eval prompts), or perplexity."""
    from .errors import LMFoundryError as _Err
    from .eval import evaluate, format_table, perplexity
    if args.perplexity is None and not args.tasks and not args.leaderboard:
        raise _Err("give --tasks (with --data-dir), --leaderboard, or --perplexity FILE")
    if args.leaderboard and args.data_dir is None:
        raise _Err("--leaderboard needs --data-dir DIR (one <task>.jsonl or .parquet per task)")
    lm = _eval_lm(args)
    if args.perplexity is not None:
        res = perplexity(lm, args.perplexity)
        r = res["results"]["perplexity"]
        print(f"perplexity of {args.perplexity}: {r['token_perplexity']:.4f} per token over {r['tokens']} tokens "
              f"(word {r['word_perplexity']:.4f}, byte {r['byte_perplexity']:.4f}, bits/byte {r['bits_per_byte']:.4f})")
    else:
        tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        res = evaluate(lm, tasks, args.data_dir, num_fewshot=args.fewshot, limit=args.limit,
                       leaderboard=args.leaderboard, seed=args.seed, log_samples=args.log_samples,
                       apply_chat_template=args.apply_chat_template, max_gen_toks=args.max_gen_toks,
                       include_paths=args.include_path, allow_code=args.allow_code,
                       bootstrap_iters=args.bootstrap_iters)
        print(format_table(res))
    if args.out:
        _write_json(args.out, res)
        print(f"wrote {args.out} ({res['total_evaluation_time_seconds']:.1f}s)", file=sys.stderr)


def cmd_eval_compare(args):
    """Results files side by side (lm-eval-shaped results and judge summaries), with standard errors."""
    from .eval.compare import compare_table
    print(compare_table(args.files))


def cmd_judge(args):
    """MT-Bench / KoMT-Bench / LogicKor / Arena-Hard / AlpacaEval 2 / WildBench with an OpenAI-compatible judge."""
    import os

    from .eval.judge import JudgeClient, format_summary, run_judge_benchmark
    from .eval.pairwise import BENCHES, format_pairwise_summary, run_pairwise_benchmark
    lm = None if args.answers else _eval_lm(args)
    key = args.judge_key if args.judge_key is not None else os.environ.get("OPENAI_API_KEY")
    out = Path(args.out)
    judge = JudgeClient(args.judge_url, key, args.judge_model,
                        cache=args.cache or out / "judge_cache.jsonl", max_tokens=args.judge_max_tokens)
    model_id = args.model_id or Path(args.model).name
    if args.bench in BENCHES:
        summary = run_pairwise_benchmark(lm, args.bench, args.questions, judge, out, baseline_path=args.baseline,
                                         answers_path=args.answers, model_id=model_id,
                                         max_new_tokens=args.max_new_tokens, limit=args.limit,
                                         style_control=args.style_control, length_penalty=args.length_penalty,
                                         difficulty_path=args.instruction_difficulty, gamed_path=args.alpaca_gamed,
                                         seed=args.seed)
        print(format_pairwise_summary(summary))
    else:
        summary = run_judge_benchmark(lm, args.questions, args.bench, judge, out, strategy=args.strategy,
                                      answers_path=args.answers, judge_prompts_path=args.judge_prompts,
                                      references_path=args.reference, max_new_tokens=args.max_new_tokens,
                                      limit=args.limit, model_id=model_id)
        print(format_summary(summary))
    print(f"wrote {out / 'summary.json'}", file=sys.stderr)


def cmd_redteam(args):
    """Red-team prompts -> responses -> pass / fail / skipped per category."""
    import os

    from .eval import redteam as rt
    records = rt.read_prompts(args.prompts)
    if args.limit:
        records = records[:args.limit]
    if args.responses:
        from .eval.data import read_records
        by_id = {r.get("id"): r.get("response", "") for r in read_records(args.responses)}
        responses = [by_id.get(r["id"], "") for r in records]
    else:
        responses = rt.generate_responses(_eval_lm(args), records, max_new_tokens=args.max_new_tokens)
    judge = None
    if args.judge_url:
        from .eval.judge import JudgeClient
        key = args.judge_key if args.judge_key is not None else os.environ.get("OPENAI_API_KEY")
        judge = JudgeClient(args.judge_url, key, args.judge_model, cache=Path(args.out).with_suffix(".cache.jsonl"))
    verdicts = rt.run_redteam(records, responses, judge)
    table = rt.table(verdicts)
    print(rt.format_table(table))
    rt.write_verdicts(args.out, verdicts, {"model": args.model, "prompts": str(args.prompts),
                                           "classifier": verdicts[0]["judge"] if verdicts else None, "table": table})
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_serve(args):
    from .serve.api import api_key_from_env, serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or api_key_from_env(),
          max_batch=args.max_batch, max_queue=args.max_queue, kv_budget=args.kv_budget,
          max_model_len=args.max_model_len, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
          device=args.device, adapter=args.adapter,
          served_model_name=args.served_model_name, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level, allowed_hosts=args.allowed_host, cors_origins=args.cors_origin)


def build_parser():
    p = argparse.ArgumentParser(prog="lmfoundry", description="Build, grow, train, merge, evaluate and serve "
                                "Llama-family models as plain Hugging Face checkpoints.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    from .checkpoint.sharded import add_parser as add_export_verbs
    from .curate.cli import add_parser as add_data_verbs
    from .peft_cli import add_parser as add_peft_verbs
    from .train.cli import add_parser as add_alignment_verbs
    for add in (_add_generation_verbs, _add_checkpoint_verbs, _add_tokenizer_verbs, _add_training_verbs,
                _add_eval_verbs, _add_judge_verbs, _add_serving_verbs, _add_run_verbs, add_data_verbs,
                add_export_verbs, add_peft_verbs, add_alignment_verbs):
        add(sub)
    return p


def _add_generation_verbs(sub):
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


def _add_checkpoint_verbs(sub):
    v = sub.add_parser("convert", help="rewrite a checkpoint in another architecture's format, or to/from GGUF")
    v.add_argument("src", help="a checkpoint directory or a .gguf file")
    v.add_argument("dst", help="a directory, or OUT.gguf")
    v.add_argument("--to", choices=["llama", "mistral", "solar", "exaone", "openelm", "gguf"],
                   help="target format (default: gguf for DST.gguf, the file's own for a .gguf SRC)")
    v.add_argument("--quant", default=None, help="GGUF tensor type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 "
                   "(default: the checkpoint's dtype; norms stay f32)")
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

    mg = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML recipe, streamed")
    mg.add_argument("recipe", help="a mergekit YAML recipe (models: or slices:, merge_method, parameters)")
    mg.add_argument("out", help="where to write the merged checkpoint (the base model's format)")
    mg.add_argument("--dry-run", action="store_true", help="print the plan, sizes and peak memory; write nothing")
    mg.add_argument("--force", action="store_true", help="replace OUT if it exists")
    mg.add_argument("--random-seed", type=int, default=0, help="seed of DARE's per-tensor masks (0)")
    mg.add_argument("--max-shard-size", default="5GB")
    mg.set_defaults(fn=cmd_merge)

    i = sub.add_parser("info", help="describe a checkpoint directory or a preset")
    i.add_argument("model")
    i.set_defaults(fn=cmd_info)

    sub.add_parser("presets", help="list model presets and their parameter counts").set_defaults(fn=cmd_presets)


def _add_tokenizer_verbs(sub):
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer; report its compression")
    tk_sub = tk.add_subparsers(dest="tokenizer_verb", required=True, metavar="ACTION")
    tt = tk_sub.add_parser("train", help="train on .txt/.jsonl/.parquet files; write tokenizer.json + "
                           "tokenizer_config.json (ChatML chat template)")
    tt.add_argument("files", nargs="+", help="data files or directories")
    tt.add_argument("--out", required=True, help="tokenizer directory to write")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--special-token", action="append", default=[], metavar="T",
                    help="a special token besides <|pad|> <s> </s> <|im_start|> <|im_end|> (repeatable)")
    tt.add_argument("--text-field", default="text", help="the text field of .jsonl records / .parquet column")
    tt.add_argument("--force", action="store_true", help="replace a tokenizer already in OUT")
    tt.set_defaults(fn=cmd_tokenizer_train)
    tr = tk_sub.add_parser("report", help="tokens per word and characters per token, per file (EXAONE's table)")
    tr.add_argument("tokenizer", help="a tokenizer or checkpoint directory")
    tr.add_argument("files", nargs="+", help="data files, e.g. one English and one Korean")
    tr.add_argument("--text-field", default="text")
    tr.set_defaults(fn=cmd_tokenizer_report)

    tz = sub.add_parser("tokenize", help="tokenize a corpus once into memory-mapped token shards for training")
    tz.add_argument("files", nargs="+", help=".txt/.jsonl/.parquet files or directories")
    tz.add_argument("--tokenizer", required=True, help="a tokenizer or checkpoint directory")
    tz.add_argument("--out", required=True, help="dataset directory (reused when the inputs are unchanged)")
    tz.add_argument("--text-field", default="text")
    tz.add_argument("--txt-mode", default="paragraph", choices=["paragraph", "line", "file"],
                    help="what one document of a .txt file is (paragraph: separated by blank lines)")
    tz.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per CPU core)")
    tz.set_defaults(fn=cmd_tokenize)


def _add_training_verbs(sub):
    from .train.settings import add_arguments
    for verb, help_ in (("pretrain", "pretrain or continue pretraining (next-token loss on packed documents)"),
                        ("sft", "supervised fine-tuning on chat data (loss on assistant tokens only)"),
                        ("dpo", "preference alignment with DPO (sigmoid, label smoothing) or IPO")):
        add_arguments(sub.add_parser(verb, help=help_), verb).set_defaults(fn=cmd_train, verb_name=verb)


def _add_eval_verbs(sub):
    ev = sub.add_parser("eval", help="benchmarks (lm-eval prompts) on local task files, the H6 leaderboard, "
                        "or perplexity")
    _model_arg(ev)
    ev.add_argument("--tasks", default=None, help="comma-separated: arc_challenge, arc_easy, hellaswag, mmlu "
                    "(or mmlu_<subject>), truthfulqa_mc1, truthfulqa_mc2, winogrande, gsm8k; lm-eval task YAML "
                    "files, directories of them, or names defined under --include-path")
    ev.add_argument("--data-dir", default=None, help="holds <task>.jsonl (or .parquet) in the dataset's schema, "
                    "plus optional <task>.train/.dev.jsonl few-shot pools; YAML tasks find Hub datasets under "
                    "DIR/<dataset_path>/<dataset_name>/<split>.jsonl")
    ev.add_argument("--include-path", action="append", default=[], metavar="DIR",
                    help="directory of lm-eval task YAML whose task, group and tag names --tasks may use")
    ev.add_argument("--allow-code", action="store_true", help="run the Python (!function, utils.py next to the "
                    "YAML) that task YAML files name; refused without this flag")
    ev.add_argument("--bootstrap-iters", type=int, default=1000, help="resamples for the standard errors of "
                    "f1 / mcc / perplexity / median (lm-eval's default is 100000; 0 = none)")
    ev.add_argument("--fewshot", type=int, default=None, help="shots for every task (default: lm-eval's per task)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N documents of each (sub)task")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-length", type=int, default=None, help="context to use (default: the model's)")
    ev.add_argument("--leaderboard", action="store_true", help="Open LLM Leaderboard v1: 25/10/5/0/5/5 shots, "
                    "harness b281b09 protocol; prints the H6 table and average")
    ev.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default 1234)")
    ev.add_argument("--max-gen-toks", type=int, default=None, help="generation budget for GSM8K (default 256)")
    ev.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template "
                    "(shots as turns)")
    ev.add_argument("--log-samples", action="store_true", help="per-sample prompts, outputs and scores in the JSON")
    ev.add_argument("--no-share-prefix", action="store_true", help="score every choice with its full context "
                    "(no KV-cache reuse)")
    ev.add_argument("--perplexity", default=None, metavar="FILE", help="token/word/byte perplexity of a .txt "
                    "(one document) or .jsonl ({text}) file")
    ev.add_argument("--out", default=None, help="results.json (lm-eval's shape)")
    ev.set_defaults(fn=cmd_eval)

    cmp_ = sub.add_parser("eval-compare", help="results files side by side with standard errors "
                          "(also: lmfoundry eval compare A.json B.json ...)")
    cmp_.add_argument("files", nargs="+", help="results.json of `lmfoundry eval` / lm-eval, or judge summary.json")
    cmp_.set_defaults(fn=cmd_eval_compare)


def _add_judge_verbs(sub):
    jd = sub.add_parser("judge", help="MT-Bench / KoMT-Bench / LogicKor / Arena-Hard / AlpacaEval 2 / WildBench "
                        "graded by an OpenAI-compatible judge")
    _model_arg(jd)
    jd.add_argument("--bench", required=True, choices=["mt-bench", "komt-bench", "logickor", "arena-hard",
                                                        "alpaca-eval", "wildbench"])
    jd.add_argument("--questions", required=True, help="the benchmark's question file (jsonl/parquet)")
    jd.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    jd.add_argument("--judge-key", default=None, help="API key (default: $OPENAI_API_KEY)")
    jd.add_argument("--judge-model", default="gpt-4-0613")
    jd.add_argument("--judge-max-tokens", type=int, default=2048)
    jd.add_argument("--judge-prompts", default=None, help="FastChat judge_prompts file (KoMT: judge_prompts_ko.jsonl)")
    jd.add_argument("--reference", default=None, help="FastChat reference_answer/<model>.jsonl")
    jd.add_argument("--strategy", default="default", choices=["default", "1-shot", "cot-1-shot"],
                    help="LogicKor prompt strategy (default = 0-shot)")
    jd.add_argument("--answers", default=None, help="grade existing answers (model_answer or LogicKor generated)")
    jd.add_argument("--model-id", default=None)
    jd.add_argument("--max-new-tokens", type=int, default=1024)
    jd.add_argument("--batch-size", type=int, default=8)
    jd.add_argument("--limit", type=int, default=None)
    jd.add_argument("--cache", default=None, help="judgment cache (default: OUT/judge_cache.jsonl)")
    jd.add_argument("--baseline", default=None, help="Arena-Hard / WildBench (reward) / AlpacaEval: the baseline "
                    "model's answers (AlpacaEval defaults to the eval set's own outputs)")
    jd.add_argument("--style-control", action="store_true", help="Arena-Hard: control for length and markdown")
    jd.add_argument("--length-penalty", type=int, default=500, help="WildBench WB-Reward K (characters; -1 = off)")
    jd.add_argument("--instruction-difficulty", default=None, help="AlpacaEval's instruction_difficulty.csv")
    jd.add_argument("--alpaca-gamed", default=None, help="AlpacaEval's df_gamed.csv (regularises the LC GLM)")
    jd.add_argument("--seed", type=int, default=0, help="answer-order and bootstrap seed")
    jd.add_argument("--out", required=True, help="output directory")
    jd.set_defaults(fn=cmd_judge)

    rtp = sub.add_parser("redteam", help="red-team prompts -> responses -> pass/fail/skipped by category")
    _model_arg(rtp)
    rtp.add_argument("--prompts", required=True, help="jsonl/parquet: {id, category, prompt, [harmful], ...}")
    rtp.add_argument("--responses", default=None, help="use these {id, response} instead of generating")
    rtp.add_argument("--judge-url", default=None, help="OpenAI-compatible judge (default: local keyword classifier)")
    rtp.add_argument("--judge-key", default=None)
    rtp.add_argument("--judge-model", default="gpt-4-0613")
    rtp.add_argument("--max-new-tokens", type=int, default=256)
    rtp.add_argument("--batch-size", type=int, default=8)
    rtp.add_argument("--limit", type=int, default=None)
    rtp.add_argument("--out", required=True, help="verdicts.jsonl (+ .summary.json)")
    rtp.set_defaults(fn=cmd_redteam)


def _add_serving_verbs(sub):
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_arg(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics, "
                    "and a browser login (key as password) for the chat page (default: $LMFOUNDRY_API_KEY, else none)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    sv.add_argument("--max-queue", type=int, default=64, help="sequences that may wait beyond the batch; "
                    "more get 429")
    sv.add_argument("--kv-budget", type=int, default=None, help="KV-cache tokens running requests may reserve "
                    "(prompt + max_tokens each; default: max-batch x context)")
    sv.add_argument("--max-model-len", type=int, default=None, help="tokens per request (prompt + output) and "
                    "per cache row (default: the model's context); the cache is max-batch x this, allocated up front")
    sv.add_argument("--served-model-name", default=None, help="model id in the API (default: directory name)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get "
                    "to finish on SIGTERM before they are cancelled")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="a host name the server "
                    "may be reached under besides IP addresses and localhost (DNS-rebinding check; repeatable)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="an origin whose pages "
                    "may call the API, e.g. http://localhost:3000 ('*' for any; default: none; repeatable)")
    sv.set_defaults(fn=cmd_serve)


def _add_run_verbs(sub):
    pl = sub.add_parser("plot", help="loss, learning-rate and throughput curves of training runs as PNGs")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output directories (their metrics.jsonl)")
    pl.add_argument("--out", default=".", help="directory for loss.png, lr.png, throughput.png (default: .)")
    pl.add_argument("--x", default="step", choices=["step", "tokens"], help="x axis (default: step)")
    pl.set_defaults(fn=cmd_plot)

    q = sub.add_parser("quickstart", help="the SOLAR recipe end to end on generated data, with a report "
                       "(the main job; a rerun resumes where it stopped)")
    q.add_argument("--out", default="runs/quickstart", help="output directory (report.md, final/, models/, data/)")
    q.add_argument("--fast", action="store_true", help="a ~1-minute smoke run: smaller model, data and budgets")
    q.add_argument("--force", action="store_true", help="delete --out and start over")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    q.set_defaults(fn=cmd_quickstart)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if verb is not None and argv[verb:verb + 2] == ["eval", "compare"]:
        argv[verb:verb + 2] = ["eval-compare"]
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
