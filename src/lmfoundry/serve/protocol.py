"""The OpenAI request formats, parsed and checked by hand so every mistake becomes one
OpenAI-style error ({"error": {"message", "type", "param", "code"}}) naming the field.

Fields follow OpenAI's API; a few vLLM extras that evaluation and benchmarking need are
accepted too: top_k, repetition_penalty, ignore_eos, stop_token_ids, include_stop_str_in_output,
return_tokens_as_token_ids, add_special_tokens (completions), chat_template_kwargs and
add_generation_prompt (chat).
Features the server does not have (tools, logit_bias, presence/frequency penalties, JSON
mode, suffix, beam search) are refused with 400 rather than silently ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import LMFoundryError

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 64
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def parse_json(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"We could not parse the JSON body of your request ({e}). The body must be a JSON object.",
                  code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"The request body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    return data


# ---- typed field readers ---------------------------------------------------------------

def _int(d: dict, name: str, default, lo=None, hi=None):
    v = d.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(f"'{name}' must be an integer, got {v!r:.40}.", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f"at least {lo}" if hi is None else f"between {lo} and {hi}" if lo is not None else f"at most {hi}"
        raise bad(f"'{name}' must be {where}, got {v}.", name)
    return v


def _float(d: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = d.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {v!r:.40}.", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {v:g}.", name)
    return float(v)


def _bool(d: dict, name: str, default: bool = False) -> bool:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {v!r:.40}.", name)
    return v


def _stop(d: dict) -> tuple[str, ...]:
    v = d.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings.", "stop")
    if any(s == "" for s in items):
        raise bad("'stop' strings must not be empty.", "stop")
    if len(items) > 64:
        raise bad(f"'stop' may hold at most 64 strings, got {len(items)}.", "stop")
    return tuple(dict.fromkeys(items))


def _ids(d: dict, name: str) -> tuple[int, ...]:
    v = d.get(name)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad(f"'{name}' must be a list of token ids.", name)
    return tuple(v)


def _refuse_unsupported(d: dict, endpoint: str) -> None:
    for name in ("tools", "functions"):
        if d.get(name):
            raise bad(f"'{name}' (tool calling) is not supported by this server.", name)
    if d.get("tool_choice") not in (None, "none"):
        raise bad("'tool_choice' is not supported by this server.", "tool_choice")
    if d.get("logit_bias"):
        raise bad("'logit_bias' is not supported by this server.", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if d.get(name) not in (None, 0, 0.0):
            raise bad(f"'{name}' is not supported by this server; use 'repetition_penalty' "
                      "(transformers' multiplicative penalty) instead.", name)
    rf = d.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("'response_format' other than {\"type\": \"text\"} (JSON mode, structured outputs) "
                  "is not supported by this server.", "response_format")
    if d.get("use_beam_search"):
        raise bad("beam search is not supported by this server.", "use_beam_search")
    if endpoint == "completions" and d.get("suffix"):
        raise bad("'suffix' (insertion) is not supported by this server.", "suffix")


# ---- requests ----------------------------------------------------------------------------

@dataclass
class GenRequest:
    """What both endpoints ask of the engine, after checking."""
    model: str | None
    prompts: list[list[int]]                      # one per prompt (chat: one)
    prompt_texts: list[str | None]                # for echo; None where the prompt was token ids
    n: int = 1
    max_tokens: int | None = None                 # None: the rest of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str: bool = False
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None                   # None: off; k: the chosen token plus the top k
    echo: bool = False
    tokens_as_ids: bool = False                   # vLLM's return_tokens_as_token_ids: "token_id:123"


def _common(d: dict, endpoint: str) -> dict:
    _refuse_unsupported(d, endpoint)
    model = d.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string.", "model")
    n = _int(d, "n", 1, 1, MAX_N)
    best_of = d.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("'best_of' is not supported by this server (only best_of == n).", "best_of")
    stream = _bool(d, "stream")
    so = d.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("'stream_options' must be an object.", "stream_options")
    include_usage = bool(so and so.get("include_usage"))
    if so and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    seed = d.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("'seed' must be an integer.", "seed")
    return dict(model=model, n=n, temperature=_float(d, "temperature", 1.0, 0.0, 2.0),
                top_p=_float(d, "top_p", 1.0, 0.0, 1.0), top_k=max(0, _int(d, "top_k", 0, -1)),   # vLLM: -1 = off
                repetition_penalty=_float(d, "repetition_penalty", 1.0, 1e-3, 100.0),
                seed=None if seed is None else seed % (1 << 63), stop=_stop(d),
                stop_token_ids=_ids(d, "stop_token_ids"), ignore_eos=_bool(d, "ignore_eos"),
                include_stop_str=_bool(d, "include_stop_str_in_output"), stream=stream,
                tokens_as_ids=_bool(d, "return_tokens_as_token_ids"),
                include_usage=include_usage)


def parse_chat(d: dict, tokenizer) -> GenRequest:
    """POST /v1/chat/completions: the messages rendered with the checkpoint's chat template."""
    common = _common(d, "chat")
    messages = d.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects.", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'.", f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role {role!r:.40} is not a known role; expected one of "
                      f"{', '.join(CHAT_ROLES)}.", f"messages[{i}].role")
        if m.get("tool_calls"):
            raise bad("tool calls in messages are not supported by this server.", f"messages[{i}].tool_calls")
    max_tokens = _int(d, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(d, "max_tokens", None, 1)
    top_logprobs = _int(d, "top_logprobs", None, 0, MAX_LOGPROBS)
    want_logprobs = _bool(d, "logprobs")
    if top_logprobs is not None and not want_logprobs:
        raise bad("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
    kwargs = {}
    if d.get("chat_template_kwargs") is not None:
        if not isinstance(d["chat_template_kwargs"], dict):
            raise bad("'chat_template_kwargs' must be an object.", "chat_template_kwargs")
        kwargs = d["chat_template_kwargs"]
    add_generation_prompt = _bool(d, "add_generation_prompt", True)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            **kwargs)
    except LMFoundryError as e:
        raise bad(str(e), "messages") from None
    return GenRequest(prompts=[ids], prompt_texts=[None], max_tokens=max_tokens,
                      logprobs=(top_logprobs or 0) if want_logprobs else None, **common)


def parse_completion(d: dict, tokenizer) -> GenRequest:
    """POST /v1/completions: prompt is a string, a list of strings, token ids or lists of them."""
    common = _common(d, "completions")
    prompt = d.get("prompt")
    what = "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists."
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            items = [prompt]
        elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            items = prompt
        else:
            raise bad(what, "prompt")
    else:
        raise bad(what, "prompt")
    add_special = _bool(d, "add_special_tokens", True)
    prompts, texts = [], []
    for i, p in enumerate(items):
        if isinstance(p, str):
            prompts.append(tokenizer.encode(p, add_special_tokens=add_special))
            texts.append(p)
        else:
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise bad(f"prompt[{i}] must be a non-empty list of token ids.", "prompt")
            prompts.append(list(p))
            texts.append(None)
        if not prompts[-1]:
            raise bad(f"prompt {i} is empty after tokenization.", "prompt")
    if len(prompts) * common["n"] > MAX_N:
        raise bad(f"at most {MAX_N} completions per request (prompts x n), got {len(prompts) * common['n']}.",
                  "n")
    logprobs = _int(d, "logprobs", None, 0, MAX_LOGPROBS)
    return GenRequest(prompts=prompts, prompt_texts=texts, max_tokens=_int(d, "max_tokens", 16, 0),
                      logprobs=logprobs, echo=_bool(d, "echo"), **common)
