"""lm-evaluation-harness adapter: run any harness task on an lmfoundry model.

    python -m lmfoundry.eval.harness --model lmfoundry --model_args pretrained=PATH --tasks arc_easy
    # or, from Python:
    import lmfoundry.eval.harness            # registers model type "lmfoundry" with lm_eval
    lm_eval.simple_evaluate(model="lmfoundry", model_args="pretrained=PATH,batch_size=16", tasks=[...])

lm-eval is an optional dependency (`pip install lm-eval`); importing this module without it
raises ImportError with that hint. The stock `lm_eval` command only knows the models in its own
package, so use the module entry point above (it registers the adapter, then runs lm_eval's
own CLI with the same arguments).

model_args: pretrained (checkpoint directory, required), dtype (auto / float32 / bfloat16 /
float16), max_length, share_prefix (true: each document's requests share one prefill, the KV
cache is reused across the choices). --batch_size and --device are lm_eval's own flags.

The three request types go to lmfoundry's own primitives (eval.lm.LM): loglikelihood with
lm-eval's context/continuation split and BOS policy, loglikelihood_rolling (disjoint windows,
the first conditioned on BOS; no special tokens are added inside the document) and
generate_until (greedy unless do_sample, cut at the `until` strings).
"""
from __future__ import annotations

try:
    import lm_eval.models  # noqa: F401  (fills the registry first: lm_eval imports it only if the registry is empty)
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import model_registry, register_model
except ImportError as e:   # pragma: no cover - depends on the environment
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install lm-eval") from e

from .lm import LM


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "y")


class LMFoundryHarness(_HarnessLM):
    def __init__(self, pretrained: str, dtype: str = "auto", device: str | None = None, batch_size=16,
                 max_length=None, share_prefix=True, **kwargs):
        super().__init__()
        import torch
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"   # lm_eval's CLI passes device="cuda" by default; HFLM falls back the same way
        bs = str(batch_size)
        if bs.startswith("auto"):
            bs = bs.split(":")[1] if ":" in bs else "16"
        self.lm = LM.load(pretrained, dtype=dtype, device=device, batch_size=int(bs),
                          max_length=int(max_length) if max_length else None, share_prefix=_bool(share_prefix))
        self.pretrained = pretrained
        self.tokenizer = self.lm.tokenizer

    # ---- lm-eval's request types ----
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [req.args for req in requests]
        groups = [(req.task_name, req.doc_id) if req.doc_id is not None else ("", i)
                  for i, req in enumerate(requests)]
        self.lm.progress = not disable_tqdm
        out = self.lm.loglikelihood(pairs, groups=groups)
        for args, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        texts = [req.args[0] for req in requests]
        self.lm.progress = not disable_tqdm
        out = [s for s, _ in self.lm.loglikelihood_rolling(texts)]
        for t, s in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), s)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        reqs = [(req.args[0], dict(req.args[1] or {})) for req in requests]
        self.lm.progress = not disable_tqdm
        out = self.lm.generate_until(reqs)
        for r, s in zip(reqs, out):
            self.cache_hook.add_partial("generate_until", r, s)
        return out

    # ---- chat support (--apply_chat_template) ----
    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def chat_template(self, chat_template=False):
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


if "lmfoundry" not in model_registry or isinstance(model_registry._objs.get("lmfoundry"), str):
    register_model("lmfoundry")(LMFoundryHarness)


def main(argv=None) -> None:
    """lm_eval's own command line, with the "lmfoundry" model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
