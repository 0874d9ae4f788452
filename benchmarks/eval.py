"""Multiple-choice scoring: lmfoundry vs lm-evaluation-harness's HF backend, same checkpoint, one run.

    .venv/bin/python benchmarks/eval.py                      # 200 HellaSwag-style docs, 0-shot, ~125M Llama, CPU
    .venv/bin/python benchmarks/eval.py --fewshot 2 --n 200 --batch-size 16
    .venv/bin/python benchmarks/eval.py --device cuda

The checkpoint is the `llama-100m` preset with random weights (seeded) and a byte-level BPE
trained on the synthetic corpus (`lmfoundry.demo.train_demo_tokenizer`), saved with
`lmfoundry.checkpoint.save_model`. The task is N synthetic documents in HellaSwag's own schema
(activity_label, ctx_a, ctx_b, endings, label) plus a train split for shots, so both tools build
the same prompts (lm-eval through its own hellaswag.yaml pointed at the local files).

Timed: the evaluation call only (model loading excluded), both in fp32 with the same batch size
and thread count. Printed: wall time of each, the ratio, and the max absolute difference of the
per-choice log-likelihoods (and whether acc / acc_norm agree). lmfoundry scores each context
once and reuses its KV cache for the four endings; lm-eval runs context+ending four times.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.checkpoint import save_model  # noqa: E402
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.demo import SPECIAL_TOKENS, train_demo_tokenizer  # noqa: E402
from lmfoundry.model import Transformer  # noqa: E402

WORDS = ("the a man woman child dog team player chef driver cat crowd girl boy teacher student worker farmer "
         "walks runs jumps holds lifts cuts paints throws pours mixes climbs opens closes carries pulls pushes "
         "slowly quickly carefully again then while after before toward across under over into onto "
         "ball rope bucket knife brush ladder table window door car bike boat kitchen field river street park "
         "red blue green small large wooden metal heavy bright dark wet dry old new tall short").split()
LABELS = ("Cooking", "Washing dishes", "Playing soccer", "Painting a fence", "Fishing", "Riding a bike",
          "Home and Garden", "Personal Care and Style", "Sports and Fitness", "Removing ice from car")


def sentence(rnd, lo, hi):
    words = [rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def records(n, seed, split):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        wikihow = rnd.random() < 0.3
        ctx_a = (f"[header] How to {rnd.choice(WORDS)} a {rnd.choice(WORDS)} [title] " if wikihow else "") + \
            " ".join(sentence(rnd, 8, 16) for _ in range(2))
        ctx_b = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 6)))
        endings = [(" [step] " if wikihow else " ") + " ".join(sentence(rnd, 6, 14) for _ in range(rnd.randint(1, 2)))
                   for _ in range(4)]
        out.append({"ind": i, "activity_label": rnd.choice(LABELS), "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "ctx": ctx_a + " " + ctx_b, "endings": endings, "source_id": f"synthetic~{i}", "split": split,
                    "split_type": "indomain", "label": str(rnd.randrange(4))})
    return out


def build(tmp: Path, args):
    data = tmp / "data"
    data.mkdir()
    evald, train = records(args.n, 1, "val"), records(max(50, 2 * args.fewshot + 2), 2, "train")
    for name, rows in (("hellaswag.jsonl", evald), ("hellaswag.train.jsonl", train)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = "\n".join(" ".join([r["activity_label"], r["ctx_a"], r["ctx_b"], *r["endings"]]) for r in evald + train)
    tok = train_demo_tokenizer(vocab_size=args.vocab, text=corpus)
    tok_dir = tmp / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|pad|>"}))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = ModelConfig.from_preset(args.preset)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise SystemExit(f"tokenizer vocab {tok.get_vocab_size()} exceeds the model's {cfg.vocab_size}")
    cfg = cfg.replace(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<|pad|>"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ckpt = save_model(model, tmp / "ckpt", tokenizer_from=tok_dir)
    return data, ckpt, tok.get_vocab_size()


def run_lmfoundry(ckpt, data, args):
    from lmfoundry.eval import LM, evaluate
    lm = LM.load(ckpt, dtype="float32", device=args.device, batch_size=args.batch_size, progress=False)
    evaluate(lm, ["hellaswag"], data, num_fewshot=args.fewshot, limit=2)   # warm-up
    t0 = time.perf_counter()
    res = evaluate(lm, ["hellaswag"], data, num_fewshot=args.fewshot, log_samples=True)
    secs = time.perf_counter() - t0
    lls = {s["doc_id"]: [r[0] for r in s["resps"]] for s in res["samples"]["hellaswag"]}
    return secs, lls, res["results"]["hellaswag"]


def run_lm_eval(ckpt, data, args, tmp):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    ydir = tmp / "yaml"
    ydir.mkdir()
    files = {"train": str(data / "hellaswag.train.jsonl"), "validation": str(data / "hellaswag.jsonl")}
    (ydir / "bench_hellaswag.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks/hellaswag/hellaswag.yaml'}\ntask: bench_hellaswag\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files: {json.dumps(files)}\n")
    lm = HFLM(pretrained=str(ckpt), dtype="float32", device=args.device, batch_size=args.batch_size)
    tm = TaskManager(include_path=str(ydir))
    kw = dict(tasks=["bench_hellaswag"], num_fewshot=args.fewshot, task_manager=tm, log_samples=True,
              bootstrap_iters=0)
    lm_eval.simple_evaluate(model=lm, limit=2, **kw)   # warm-up
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, **kw)
    secs = time.perf_counter() - t0
    lls = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["bench_hellaswag"]}
    r = out["results"]["bench_hellaswag"]
    return secs, lls, {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--fewshot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary (<= the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-lm-eval", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, ckpt, vocab = build(tmp, args)
        print(f"checkpoint: {args.preset} (random weights, fp32), tokenizer vocab {vocab}; task: {args.n} "
              f"HellaSwag-schema docs x 4 endings, {args.fewshot}-shot; batch {args.batch_size}; "
              f"device {args.device}, {torch.get_num_threads()} threads")
        ours_s, ours_lls, ours_res = run_lmfoundry(ckpt, data, args)
        n_req = 4 * args.n
        print(f"lmfoundry (KV reuse):   {ours_s:8.2f} s  {n_req / ours_s:7.1f} req/s  "
              f"acc {ours_res['acc']:.4f} acc_norm {ours_res['acc_norm']:.4f}")
        if args.skip_lm_eval:
            return
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            print("lm-eval is not installed (pip install lm-eval): no comparison")
            return
        theirs_s, theirs_lls, theirs_res = run_lm_eval(ckpt, data, args, tmp)
        print(f"lm-eval hf backend:     {theirs_s:8.2f} s  {n_req / theirs_s:7.1f} req/s  "
              f"acc {theirs_res['acc']:.4f} acc_norm {theirs_res['acc_norm']:.4f}")
        pairs = [(a, b) for d in ours_lls for a, b in zip(ours_lls[d], theirs_lls[d])]
        diff = max(abs(a - b) for a, b in pairs)
        rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in pairs)
        print(f"speed-up: {theirs_s / ours_s:.2f}x   max |delta loglikelihood| over {len(pairs)} choices: {diff:.2e} "
              f"(relative {rel:.1e}; lm-eval sums the token log-probs in fp32)   "
              f"acc equal: {abs(ours_res['acc'] - theirs_res['acc']) < 1e-12}   "
              f"acc_norm equal: {abs(ours_res['acc_norm'] - theirs_res['acc_norm']) < 1e-12}")


if __name__ == "__main__":
    main()
