"""Multiple-choice scoring: lmfoundry vs lm-evaluation-harness's HF backend, same checkpoint, one run.

    .venv/bin/python benchmarks/eval.py                      # 200 HellaSwag-style docs, 0-shot, ~125M Llama, CPU
    .venv/bin/python benchmarks/eval.py --task kobest --n 40 --fewshot 5   # the five KoBEST tasks, 40 docs each
    .venv/bin/python benchmarks/eval.py --task kmmlu --n 200 --fewshot 5   # KMMLU (one subject), 5-shot from dev
    .venv/bin/python benchmarks/eval.py --device cuda

The checkpoint is the `llama-100m` preset with random weights (seeded) and a byte-level BPE
trained on the benchmark's synthetic documents (`lmfoundry.demo.train_demo_tokenizer`), saved with
`lmfoundry.checkpoint.save_model`. The documents are synthetic, in each dataset's own schema:
- hellaswag: N docs (activity_label, ctx_a, ctx_b, endings, label) + a train split for shots; both
  tools run lm-eval's hellaswag.yaml (lmfoundry: its built-in hellaswag task, the same prompts);
- kobest: N docs per task (boolq, copa, hellaswag, sentineg, wic) + train splits, laid out as the
  Hub dataset skt/kobest_v1 under a data directory; lmfoundry runs lm-eval's kobest/ folder
  unchanged (--data-dir, --allow-code for its utils.py), lm-eval the same YAML through wrappers that
  point dataset_path at the same files;
- kmmlu: N questions of KMMLU's Accounting subject (CSV, the Hub's data/Accounting-{dev,test}.csv
  layout), lm-eval's kmmlu/default/kmmlu_accounting.yaml on both sides.

Timed: the evaluation call only (model loading excluded, one warm-up call each), both in fp32 with
the same batch size and thread count. Printed: wall time of each, the ratio, the max absolute
difference of the per-choice log-likelihoods, and whether every metric agrees. lmfoundry scores each
context once and reuses its KV cache for the choices; lm-eval runs context+choice once per choice
(its one-token logits cache shares the context for single-token choices such as KMMLU's " A".." D").
lm-eval would try to download HF evaluate's f1 for KoBEST's `hf_evaluate: true` (a multiple-choice
task never calls it); the script points that lookup at lm-eval's own registry, as the tests do.
lm-eval's HF backend needs `pip install "lm-eval[hf]==0.4.13"` (it imports accelerate).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
KO_SYLLABLES = ("가 나 다 라 마 바 사 아 자 차 카 타 파 하 고 노 도 로 모 보 소 오 조 초 코 토 포 호 구 누 두 루 무 부 수 우 주 "
                "추 그 느 드 르 므 브 스 으 즈 기 니 디 리 미 비 시 이 지 치 한 국 어 학 교 생 정 부 회 사 시 장 문 제 결 과 "
                "계 획 발 표 새 로 운 중 요 간 단 했 었 였 다 는 은 을 를 에 서 의 와 과 도 만").split()
_ko = __import__("random").Random(7)
# Korean-looking words (random syllables + a particle), so the BPE splits them into several tokens
KO_WORDS = ["".join(_ko.choice(KO_SYLLABLES) for _ in range(_ko.randint(2, 4))) + _ko.choice(["", "이", "가", "를", "은", "에서"])
            for _ in range(3000)]


def sentence(rnd, lo, hi, words=WORDS):
    text = " ".join(rnd.choice(words) for _ in range(rnd.randint(lo, hi)))
    return (text.capitalize() if words is WORDS else text) + "."


def hellaswag_records(n, seed, split):
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


def kobest_record(task, rnd):
    s = lambda lo=6, hi=14: sentence(rnd, lo, hi, KO_WORDS)  # noqa: E731
    return {"boolq": lambda: {"paragraph": " ".join(s() for _ in range(4)), "question": s(4, 8)[:-1] + "?",
                              "label": rnd.randrange(2)},
            "copa": lambda: {"premise": s(), "question": rnd.choice(["원인", "결과"]), "alternative_1": s(4, 9),
                             "alternative_2": s(4, 9), "label": rnd.randrange(2)},
            "hellaswag": lambda: {"context": s(8, 16), **{f"ending_{k}": s(5, 10) for k in range(1, 5)},
                                  "label": rnd.randrange(4)},
            "sentineg": lambda: {"sentence": s(), "label": rnd.randrange(2)},
            "wic": lambda: {"word": rnd.choice(KO_WORDS), "context_1": s(), "context_2": s(), "label": rnd.randrange(2)},
            }[task]()


def _jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_data(task, data: Path, n, shots) -> tuple[dict, list[str]]:
    """Writes the documents; returns ({lm-eval task: (yaml under lm_eval/tasks, {split: file}, builder)}, texts)."""
    if task == "hellaswag":
        ev, train = hellaswag_records(n, 1, "val"), hellaswag_records(max(50, 2 * shots + 2), 2, "train")
        files = {"validation": _jsonl(data / "hellaswag.jsonl", ev), "train": _jsonl(data / "hellaswag.train.jsonl", train)}
        texts = [" ".join([r["activity_label"], r["ctx_a"], r["ctx_b"], *r["endings"]]) for r in ev + train]
        return {"hellaswag": ("hellaswag/hellaswag.yaml", files, "json")}, texts
    rnd, out, texts = random.Random(0), {}, []
    if task == "kobest":
        for sub in ("boolq", "copa", "hellaswag", "sentineg", "wic"):
            splits = {s: [kobest_record(sub, rnd) for _ in range(k)] for s, k in (("test", n), ("train", max(20, 2 * shots)))}
            texts += [" ".join(str(v) for v in r.values()) for rows in splits.values() for r in rows]
            out[f"kobest_{sub}"] = (f"kobest/kobest_{sub}.yaml", {s: _jsonl(data / "skt/kobest_v1" / sub / f"{s}.jsonl", rows)
                                                                  for s, rows in splits.items()}, "json")
        return out, texts
    files = {}
    for split, k in (("test", n), ("dev", 5)):
        rows = [{"question": sentence(rnd, 8, 20, KO_WORDS)[:-1] + "?", "answer": rnd.randint(1, 4),
                 **{c: sentence(rnd, 2, 6, KO_WORDS) for c in "ABCD"}, "Category": "HUMSS",
                 "Human Accuracy": round(rnd.random(), 3)} for _ in range(k)]
        texts += [" ".join(str(v) for v in r.values()) for r in rows]
        files[split] = data / "HAERAE-HUB/KMMLU/data" / f"Accounting-{split}.csv"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        with open(files[split], "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return {"kmmlu_accounting": ("kmmlu/default/kmmlu_accounting.yaml", files, "csv")}, texts


def build_checkpoint(tmp: Path, texts, args):
    tok = train_demo_tokenizer(vocab_size=args.vocab, text="\n".join(texts))
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
    return save_model(Transformer(cfg).eval(), tmp / "ckpt", tokenizer_from=tok_dir), tok.get_vocab_size()


def run_lmfoundry(ckpt, data, tasks, args):
    import lm_eval
    from lmfoundry.eval import LM, evaluate
    lm = LM.load(ckpt, dtype="float32", device=args.device, batch_size=args.batch_size, progress=False)
    root = Path(lm_eval.__file__).parent / "tasks"
    items = ["hellaswag"] if args.task == "hellaswag" else \
        [str(root / "kobest")] if args.task == "kobest" else [str(root / tasks["kmmlu_accounting"][0])]
    kw = dict(num_fewshot=args.fewshot, allow_code=True, bootstrap_iters=0, log_samples=True)
    evaluate(lm, items, data, limit=2, **kw)   # warm-up
    return lambda: _timed(lambda: evaluate(lm, items, data, **kw), lambda res: _ours_summary(res, tasks))


def _timed(run, summarize):
    t0 = time.perf_counter()
    out = run()
    return (time.perf_counter() - t0, *summarize(out))


def _ours_summary(res, tasks):
    lls = {(t, s["doc_id"]): [r[0] for r in s["resps"]] for t in tasks for s in res["samples"][t]}
    return lls, {t: {k: v for k, v in res["results"][t].items() if k in ("acc", "acc_norm", "f1")} for t in tasks}


def run_lm_eval(ckpt, tasks, args, tmp):
    import lm_eval
    import lm_eval.api.task as task_module
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    real = task_module.get_metric
    task_module.get_metric = lambda name, hf_evaluate_metric=False: real(name, False)
    root = Path(lm_eval.__file__).parent / "tasks"
    ydir = tmp / "yaml"
    ydir.mkdir()
    for name, (yaml_file, files, builder) in tasks.items():
        (ydir / f"{name}.yaml").write_text(
            f"include: {root / yaml_file}\ntask: {name}\ndataset_path: {builder}\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files: {json.dumps({s: str(p) for s, p in files.items()})}\n")
    lm = HFLM(pretrained=str(ckpt), dtype="float32", device=args.device, batch_size=args.batch_size)
    tm = TaskManager(include_path=str(ydir), include_defaults=False)
    kw = dict(tasks=list(tasks), num_fewshot=args.fewshot, task_manager=tm, log_samples=True, bootstrap_iters=0)
    lm_eval.simple_evaluate(model=lm, limit=2, **kw)   # warm-up
    return lambda: _timed(lambda: lm_eval.simple_evaluate(model=lm, **kw), lambda out: _theirs_summary(out, tasks))


def _theirs_summary(out, tasks):
    lls = {(t, s["doc_id"]): [r[0][0] for r in s["resps"]] for t in tasks for s in out["samples"][t]}
    metrics = {t: {k.split(",")[0]: v for k, v in out["results"][t].items()
                   if k.split(",")[0] in ("acc", "acc_norm", "f1") and k.endswith(",none")} for t in tasks}
    return lls, metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hellaswag", choices=["hellaswag", "kobest", "kmmlu"])
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--n", type=int, default=200, help="documents (KoBEST: per task)")
    ap.add_argument("--fewshot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (<= the model's; default 8000, "
                    "600 for the Korean tasks so that a Korean word is several tokens, as in Llama-family tokenizers)")
    ap.add_argument("--repeat", type=int, default=1, help="time each side this many times, alternating; report the "
                    "fastest (steadier on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-lm-eval", action="store_true")
    args = ap.parse_args()
    args.vocab = args.vocab or (8000 if args.task == "hellaswag" else 600)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        tasks, texts = write_data(args.task, data, args.n, args.fewshot)
        ckpt, vocab = build_checkpoint(tmp, texts, args)
        print(f"checkpoint: {args.preset} (random weights, fp32), tokenizer vocab {vocab}; task: {args.task}, "
              f"{args.n} docs{' per task' if args.task == 'kobest' else ''}, {args.fewshot}-shot; "
              f"batch {args.batch_size}; device {args.device}, {torch.get_num_threads()} threads; best of {args.repeat}")
        sides = {"lmfoundry (KV reuse):": run_lmfoundry(ckpt, data, tasks, args)}
        if not args.skip_lm_eval:
            sides["lm-eval hf backend:  "] = run_lm_eval(ckpt, tasks, args, tmp)
        best = {}
        for _ in range(args.repeat):
            for name, run in sides.items():
                secs, lls, metrics = run()
                if name not in best or secs < best[name][0]:
                    best[name] = (secs, lls, metrics)
        for name, (secs, lls, metrics) in best.items():
            n_req = sum(len(v) for v in lls.values())
            print(f"{name}   {secs:8.2f} s  {n_req / secs:7.1f} req/s  {json.dumps(metrics)}")
        if len(best) == 2:
            (ours_s, ours_lls, ours_res), (theirs_s, theirs_lls, theirs_res) = best.values()
            pairs = [(a, b) for d in ours_lls for a, b in zip(ours_lls[d], theirs_lls[d])]
            diff = max(abs(a - b) for a, b in pairs)
            same = all(abs(ours_res[t][k] - v) < 1e-12 for t in theirs_res for k, v in theirs_res[t].items())
            print(f"speed-up: {theirs_s / ours_s:.2f}x   max |delta loglikelihood| over {len(pairs)} choices: "
                  f"{diff:.2e} (lm-eval sums the token log-probs in fp32)   every metric equal: {same}")


if __name__ == "__main__":
    main()
