"""Hugging Face tokenizer directories, read with the `tokenizers` library alone.

`load_tokenizer(dir)` gives the same ids, text and chat prompts as transformers'
`AutoTokenizer.from_pretrained(dir)` for tokenizer.json-based checkpoints:
- tokenizer.json is authoritative: its post-processor decides BOS/EOS. transformers 5 drops
  `add_bos_token`/`add_eos_token` from tokenizer_config.json whenever tokenizer.json exists, and so do we.
- named special tokens not yet known as special added tokens are added as special (as transformers
  does), so `vocab_size` equals `len(AutoTokenizer...)`.
- chat templates render in the same sandboxed jinja2 setup transformers uses.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from .errors import TokenizerError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if there is no such file."""
    if not path.is_file():
        return None  # the optional files may be absent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value, where: str) -> str | None:
    """A special token is a plain string or an AddedToken dict {"content": ..., ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a string or {{\"content\": ...}}, got {value!r}")


def load_tokenizer(path) -> Tokenizer:
    """Load tokenizer.json, tokenizer_config.json, special_tokens_map.json and the chat template from `path`."""
    from .checkpoint.gguf import gguf_tokenizer, is_gguf
    if is_gguf(path):   # rebuilt from the file's metadata
        return gguf_tokenizer(path)
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found")
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise TokenizerError(f"{tok_file}: file not found (a Hugging Face tokenizer directory needs it)")
    try:
        backend = _Backend.from_str(tok_file.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception; find the precise reason for the message
        _read_json(tok_file)  # raises on malformed JSON
        raise TokenizerError(f"{tok_file}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None

    cfg_file, map_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
    config = _read_json(cfg_file) or {}
    special = {k: _token_str(config.get(k), f"{cfg_file}: {k}") for k in SPECIAL_TOKEN_NAMES}
    if "added_tokens_decoder" not in config:  # transformers reads the legacy map only then, and lets it win
        for k, v in (_read_json(map_file) or {}).items():
            if k in SPECIAL_TOKEN_NAMES:
                special[k] = _token_str(v, f"{map_file}: {k}")

    template, template_problem = None, None
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # newer transformers; takes priority over the config entry
        source = str(jinja_file)
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja_file}: not UTF-8 text ({e})") from None
    else:
        raw, source = config.get("chat_template"), f"{cfg_file}: chat_template"
        if isinstance(raw, list):
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
            if raw is None:
                template_problem = f"{source}: no template named 'default' (have {sorted(map(str, named))})"
        if raw is not None and not isinstance(raw, str):
            raise TokenizerError(f"{source}: expected a string or a list of {{name, template}}, got {raw!r}")
        template = raw
    return Tokenizer(backend, special, template, source, template_problem,
                     split_special_tokens=bool(config.get("split_special_tokens", False)),
                     clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)))


class Tokenizer:
    def __init__(self, backend: _Backend, special_tokens: dict, chat_template: str | None = None,
                 template_source: str = "chat template", template_problem: str | None = None,
                 split_special_tokens: bool = False, clean_up_spaces: bool = False):
        self._tok = backend
        backend.no_truncation()  # transformers switches tokenizer.json's truncation/padding off per call
        backend.no_padding()
        backend.encode_special_tokens = split_special_tokens
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
        for content in dict.fromkeys(self.special_tokens.values()):
            old = added.get(content)
            if old is None or not old.special:  # transformers registers every named token as special
                keep = dict(single_word=old.single_word, lstrip=old.lstrip, rstrip=old.rstrip,
                            normalized=old.normalized) if old is not None else dict(normalized=False)
                backend.add_special_tokens([AddedToken(content, special=True, **keep)])
        # transformers skips its space clean-up for BPE models (it would corrupt their output)
        self._clean_up = clean_up_spaces and type(backend.model).__name__ != "BPE"
        self.chat_template = chat_template
        self._template_source, self._template_problem = template_source, template_problem
        self._compiled = None

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ---- text <-> ids ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:  # transformers' clean_up_tokenization_spaces: drop the space before punctuation
            for s in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
                text = text.replace(s, s.strip())
        return text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, **extra):
        """Render `messages` with the checkpoint's chat template (as transformers does); ids if `tokenize`."""
        if self.chat_template is None:
            raise TokenizerError(self._template_problem or f"{self._template_source}: tokenizer has no chat template "
                                 "(no chat_template.jinja and no chat_template in tokenizer_config.json)")
        messages = _checked_messages(messages)
        if self._compiled is None:
            self._compiled = self._compile(self.chat_template)
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TokenizerError:
            raise
        except Exception as e:  # jinja2.TemplateError, or a Python error inside the template
            raise TokenizerError(f"{self._template_source}: chat template failed: "
                                 f"{type(e).__name__}: {_one_line(e)}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _compile(self, source: str):
        where = self._template_source

        def raise_exception(message):
            raise TokenizerError(f"{where}: chat template raised: {_one_line(message)}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        # jinja's own tojson escapes HTML characters; transformers' (and ours) is plain json.dumps
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{where}: chat template syntax error at line {e.lineno}: {e.message}") from None


def _one_line(message) -> str:
    return " ".join(str(message).split())


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _checked_messages(messages) -> list[dict]:
    """Validate a conversation; return copies without None-valued keys (transformers drops them)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"chat messages: expected a non-empty list of {{role, content}} dicts, "
                             f"got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"chat messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str):
            raise TokenizerError(f"chat messages[{i}].role: expected a string, got {m.get('role')!r:.80}")
        content = m.get("content")
        if content is None and "tool_calls" not in m:
            raise TokenizerError(f"chat messages[{i}].content: missing (only tool-call messages may omit it)")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise TokenizerError(f"chat messages[{i}].content[{j}]: expected "
                                         f"{{'type': 'text', 'text': str}}, got {part!r:.80}")
        elif content is not None and not isinstance(content, str):
            raise TokenizerError(f"chat messages[{i}].content: expected a string or a list of text parts, "
                                 f"got {type(content).__name__}")
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
        if reasoning is not None:  # transformers fills both names templates read
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class StreamDecoder:
    """Incremental detokenization: `push(id)` returns the newly final text ("" while a character is incomplete).

    Only a window of recent ids is decoded: `prefix` ids (already emitted, decoded for context so that
    decoders which strip a leading space or join pieces behave as in a full decode) and the pending ids.
    Text is held back while the decoded tail ends in U+FFFD (an unfinished UTF-8 sequence).
    "".join(pieces) + flush() == tokenizer.decode(all_ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []  # window: self._ids[:self._read] emitted context, the rest pending
        self._read = 0
        self._prefix_text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        piece = text[len(self._prefix_text):]
        self._ids = self._ids[self._read:]  # the pending ids become the next context
        self._read = len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        return piece

    def flush(self) -> str:
        """Return whatever is held back (possibly ending in U+FFFD) and reset."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        piece = text[len(self._prefix_text):]
        self._ids, self._read, self._prefix_text = [], 0, ""
        return piece
