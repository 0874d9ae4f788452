"""`lmfoundry data ...`: the curation verbs (lmfoundry.cli adds this group with one call).

    lmfoundry data curate curate.yaml [--shard I/N | --merge] [--workers W] [--force]
    lmfoundry data filter  FILES --out DIR [--steps gopher_quality,c4] [--classifier M --threshold T]
    lmfoundry data dedup   FILES --out DIR [--threshold 0.8] [--exact-only]
    lmfoundry data decontaminate FILES --out DIR --tasks arc_challenge,gsm8k --data-dir evaldata/ [--flag-only]
    lmfoundry data redact  FILES --out DIR [--types email,phone]
    lmfoundry data classifier train --positive FILES --negative FILES --out quality.bin

A single-step verb is the pipeline with that one step (same outputs, report, resume and sharding).
"""
from __future__ import annotations

from ..errors import DataError

FILTER_STEPS = "gopher_quality,gopher_repetition,c4,fineweb"


def parse_shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise DataError(f"--shard {value!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise DataError(f"--shard {value!r}: I must be in 0..N-1")
    return i, n


def _run_args(p, single: bool):
    if single:
        p.add_argument("files", nargs="+", help=".txt/.jsonl/.json/.parquet files or directories (.gz/.zst too)")
        p.add_argument("--out", required=True, help="output directory (data/, removed/, report.md)")
        p.add_argument("--text-field", default="text", help="records' text field / parquet column")
        p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="kept documents' format")
        p.add_argument("--shards", type=int, default=None, help="work units (default: one per input file)")
    else:
        p.add_argument("config", help="pipeline YAML (inputs, output, steps)")
        p.add_argument("--out", default=None, help="output directory (overrides the YAML's)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    p.add_argument("--shard", default=None, metavar="I/N", help="only shards k with k %% N == I (one cluster task)")
    p.add_argument("--merge", action="store_true", help="only the dedup merge over every shard's signatures")
    p.add_argument("--force", action="store_true", help="start over if OUT holds a run of another config")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip the rest of an unreadable file (named in the report) instead of stopping")


def _steps(args) -> list:
    v = args.data_verb
    if v == "filter":
        steps = [s for s in args.steps.split(",") if s]
        if args.keep_lang:
            steps.insert(0, {"language": {"keep": args.keep_lang.split(",")}})
        if args.classifier:
            steps.append({"classifier": {"model": args.classifier, "threshold": args.threshold}})
        return steps
    if v == "dedup":
        return [{"dedup": {"threshold": args.threshold, "near": not args.exact_only}}]
    if v == "decontaminate":
        return [{"decontaminate": {"tasks": args.tasks, "data_dir": args.data_dir, "n": args.n,
                                   "action": "flag" if args.flag_only else "remove"}}]
    return [{"redact": {"types": args.types.split(",")} if args.types else {}}]


def cmd_data(args):
    from .classifier import train_classifier
    from .config import load_config, make_config
    from .pipeline import curate
    if args.data_verb == "classifier":
        r = train_classifier(args.positive, args.negative, args.out, text_field=args.text_field,
                             epoch=args.epoch, wordNgrams=args.word_ngrams, bucket=args.bucket)
        acc = f", held-out accuracy {r['holdout_accuracy']:.3f} on {r['holdout']}" if "holdout_accuracy" in r else ""
        print(f"wrote {args.out} ({r['documents']['hq']} positive, {r['documents']['cc']} negative documents{acc})")
        return
    overrides = {"output": args.out, "workers": args.workers}
    if args.data_verb == "curate":
        cfg = load_config(args.config, **overrides)
    else:
        cfg = make_config({"inputs": args.files, "steps": _steps(args), "text_field": args.text_field,
                           "format": args.format, "shards": args.shards}, f"lmfoundry data {args.data_verb}",
                          **overrides)
    cfg.extra["skip_bad_files"] = args.skip_bad_files
    shard = parse_shard(args.shard) if args.shard else None
    report = curate(cfg, shard=shard, merge_only=args.merge, force=args.force)
    st = report["stats"]
    print(f"{cfg.output}: {st['documents']['out']:,} of {st['documents']['in']:,} documents kept "
          f"({report['shards']['done']}/{report['shards']['total']} shards finished); see {cfg.output}/report.md")


def add_parser(sub):
    """The `data` verb group, added to lmfoundry's top-level subparsers."""
    d = sub.add_parser("data", help="curate pretraining data: filter, redact, deduplicate, decontaminate")
    dv = d.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    _run_args(dv.add_parser("curate", help="run a pipeline YAML (resumable, shardable)"), single=False)
    f = dv.add_parser("filter", help="rule-based (Gopher, C4, FineWeb) and classifier filters")
    _run_args(f, single=True)
    f.add_argument("--steps", default=FILTER_STEPS, help=f"comma-separated filters (default: {FILTER_STEPS})")
    f.add_argument("--keep-lang", default=None, help="keep only these languages, e.g. en,ko")
    f.add_argument("--classifier", default=None, metavar="MODEL", help="fastText quality model")
    f.add_argument("--threshold", type=float, default=None, help="keep documents scoring at least this")
    dd = dv.add_parser("dedup", help="exact and MinHash near-duplicate removal across all inputs")
    _run_args(dd, single=True)
    dd.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    dd.add_argument("--exact-only", action="store_true", help="skip near-duplicate detection")
    dc = dv.add_parser("decontaminate", help="remove (or flag) documents sharing n-grams with eval tasks")
    _run_args(dc, single=True)
    dc.add_argument("--tasks", required=True, help="comma-separated tasks, as for `lmfoundry eval`")
    dc.add_argument("--data-dir", required=True, help="the task files' directory, as for `lmfoundry eval`")
    dc.add_argument("--n", type=int, default=13, help="n-gram length (13, as GPT-3 and lm-eval)")
    dc.add_argument("--flag-only", action="store_true", help="keep contaminated documents, only mark them")
    r = dv.add_parser("redact", help="replace e-mails, phones, IPs, credit cards, Korean RRNs by placeholders")
    _run_args(r, single=True)
    r.add_argument("--types", default=None, help="comma-separated PII types (default: all)")
    c = dv.add_parser("classifier", help="the fastText quality classifier")
    cv = c.add_subparsers(dest="classifier_verb", required=True, metavar="ACTION")
    t = cv.add_parser("train", help="train on positive (high quality) and negative documents")
    t.add_argument("--positive", nargs="+", required=True, help="files or directories of good documents")
    t.add_argument("--negative", nargs="+", required=True, help="files or directories of other documents")
    t.add_argument("--out", required=True, help="model file to write (fastText .bin)")
    t.add_argument("--text-field", default="text")
    t.add_argument("--epoch", type=int, default=5)
    t.add_argument("--word-ngrams", type=int, default=2, help="2 = unigrams + bigrams (DCLM)")
    t.add_argument("--bucket", type=int, default=2_000_000, help="hash buckets for word n-grams (fastText's 2M)")
    d.set_defaults(fn=cmd_data)
    return d

