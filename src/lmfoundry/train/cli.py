"""`lmfoundry reward | online-dpo | grpo` (lmfoundry.cli adds them with one call).

    lmfoundry reward --model SFT --data pairs.jsonl --out RM          Bradley-Terry reward model
    lmfoundry reward score RM --data heldout.jsonl                    pairwise accuracy, reward distribution
    lmfoundry online-dpo --model POLICY --prompts p.jsonl --out DIR (--reward RM | --verifier math | --judge URL)
    lmfoundry grpo --model POLICY --prompts p.jsonl --out DIR (--verifier math | --reward RM | --judge URL)

The training verbs take every setting of lmfoundry.train.settings (flags, or --config YAML) and
run under torchrun like pretrain, sft and dpo.
"""
from __future__ import annotations

HELP = {"reward": "train a Bradley-Terry reward model on preference pairs (saved as a Hugging Face "
                  "sequence classifier); `reward score RM --data FILE` evaluates one",
        "online-dpo": "online DPO: the policy's own samples, scored by a reward model, a verifier or a judge, "
                      "best vs worst",
        "grpo": "GRPO: group-normalised advantages over the policy's own samples, clipped ratio, TRL's loss types"}


def cmd_train(args):
    from .recipe import run
    from .settings import resolve
    run(args.verb_name, resolve(args.verb_name, vars(args), args.config))


def cmd_score(args):
    import json
    from pathlib import Path

    from ..tokenizer import load_tokenizer
    from .reward import format_scores, load_reward_model, score_pairs, tokenizer_dir
    rm = load_reward_model(args.rm, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir(args.rm))
    res = score_pairs(rm, tokenizer, args.data, batch_size=args.batch_size,
                      seq_len=args.seq_len or rm.config.max_seq_len)
    print(format_scores(res))
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(out)


def add_parser(sub):
    from .settings import add_arguments
    for verb in ("reward", "online-dpo", "grpo"):
        p = add_arguments(sub.add_parser(verb, help=HELP[verb]), verb)
        p.set_defaults(fn=cmd_train, verb_name=verb)
        if verb == "reward":
            actions = p.add_subparsers(dest="reward_action", required=False, metavar="ACTION")
            s = actions.add_parser("score", help="pairwise accuracy and reward distribution on preference pairs")
            s.add_argument("rm", help="a reward model directory (*ForSequenceClassification) or "
                           "its LoRA adapter directory (on the base its adapter_config.json names)")
            s.add_argument("--data", nargs="+", required=True, metavar="FILE", help="preference .jsonl/.parquet")
            s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the reward model's)")
            s.add_argument("--batch-size", type=int, default=16, help="pairs per forward (16)")
            s.add_argument("--seq-len", type=int, default=None, help="tokens per reply at most (default: context)")
            s.add_argument("--device", default=None, help="cpu (default), cuda, ...")
            s.add_argument("--out", default=None, help="also write the figures as JSON")
            s.set_defaults(fn=cmd_score)
