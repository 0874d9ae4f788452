"""lmfoundry.tokenizer against transformers' AutoTokenizer on tokenizer directories built here (no hub access)."""
from __future__ import annotations

import json
import shutil

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmfoundry.errors import TokenizerError
from lmfoundry.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
AutoTokenizer = transformers.AutoTokenizer
PreTrainedTokenizerFast = transformers.PreTrainedTokenizerFast

CORPUS = [
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "한국어 문장입니다. 안녕하세요, 만나서 반갑습니다!",
    "Emoji 😀🎉 are fun 👍",
    "   spaces   and\ttabs\n\nnewlines",
] * 4
TEXTS = [
    "Hello world, this is a test.",
    "한국어 문장입니다. 오늘 날씨가 좋네요!",
    "Emoji 😀🎉 and a family 👩‍👩‍👧 and flags 🇰🇷",
    "   leading spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "<|begin_of_text|>special<|eot_id|> tokens inside <|start_header_id|>text<|end_header_id|>",
    "unseen: ñ ü 中文 ∑ \u200b",
    "",
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STRICT_ROLE_TEMPLATE = (
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "    {{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "  {% endif %}\n"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
)
FANCY_TEMPLATE = (  # namespace, loop.last, continue (loopcontrols), tojson kwargs, strftime_now, generation
    "{%- set ns = namespace(system='', count=0) -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message.role == 'system' -%}{%- set ns.system = message.content -%}{%- continue -%}{%- endif -%}\n"
    "  {%- set ns.count = ns.count + 1 -%}\n"
    "  [{{ ns.count }}] {{ message | tojson }}{% if not loop.last %}\n{% endif %}\n"
    "{%- endfor %}\n"
    "{% if tools %}TOOLS: {{ tools | tojson(indent=2) }}{% endif %}\n"
    "SYSTEM={{ ns.system | tojson }} YEAR={{ strftime_now('%Y') }}\n"
    "{%- if add_generation_prompt %}\n>>> {% endif %}"
    "{% generation %}{{ messages[-1].content | tojson }}{% endgeneration %}"
)
MESSAGES = [
    {"role": "system", "content": "You are <b>helpful</b> & \"kind\"."},
    {"role": "user", "content": "  안녕하세요! What's 2+2? 😀  "},
    {"role": "assistant", "content": "It's 4."},
    {"role": "user", "content": "Thanks\nbye"},
]


def _train_bpe(specials, byte_level=True):
    tok = Backend(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: "▁" marks spaces, the decoder strips the leading one
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS + TEXTS, trainer)
    return tok


def _bos_post_processor(tok, bos):
    bos_id = tok.token_to_id(bos)
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def _edit_json(path, **updates):
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}

    # (a) Llama-3 style: byte-level BPE, BOS added by tokenizer.json's post-processor, template saved by transformers
    base = _train_bpe(LLAMA3_SPECIALS)
    base.post_processor = _bos_post_processor(base, "<|begin_of_text|>")
    hf = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 pad_token="<|end_of_text|>")
    hf.chat_template = LLAMA3_TEMPLATE
    hf.save_pretrained(root / "llama3")
    out["llama3"] = root / "llama3"

    # (b1) no post-processor in tokenizer.json, tokenizer_config.json says add_bos_token/add_eos_token=true
    nopp = root / "nopp_add_bos"
    shutil.copytree(out["llama3"], nopp)
    _edit_json(nopp / "tokenizer.json", post_processor=None)
    _edit_json(nopp / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    out["nopp_add_bos"] = nopp
    # (b2) BOS post-processor, tokenizer_config.json says add_bos_token=false
    pp = root / "pp_no_add_bos"
    shutil.copytree(out["llama3"], pp)
    _edit_json(pp / "tokenizer_config.json", add_bos_token=False)
    out["pp_no_add_bos"] = pp

    # ChatML, hand-written legacy layout: template in tokenizer_config.json, special tokens as AddedToken dicts
    chatml = root / "chatml"
    shutil.copytree(out["llama3"], chatml)
    (chatml / "chat_template.jinja").unlink()
    tj = json.loads((chatml / "tokenizer.json").read_text())
    tj["added_tokens"] += [{"id": 420 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate(["<|im_start|>", "<|im_end|>"])]
    (chatml / "tokenizer.json").write_text(json.dumps(tj))
    im_end = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
              "rstrip": False, "single_word": False}
    _edit_json(chatml / "tokenizer_config.json", chat_template=CHATML_TEMPLATE, eos_token=im_end, bos_token=None)
    (chatml / "special_tokens_map.json").write_text(json.dumps({"eos_token": im_end, "pad_token": "<|end_of_text|>"}))
    out["chatml"] = chatml

    for name, template in (("strict", STRICT_ROLE_TEMPLATE), ("fancy", FANCY_TEMPLATE)):
        d = root / name
        shutil.copytree(out["llama3"], d)
        (d / "chat_template.jinja").write_text(template)
        out[name] = d
    listed = root / "listed"  # older transformers: several named templates in tokenizer_config.json
    shutil.copytree(out["chatml"], listed)
    _edit_json(listed / "tokenizer_config.json",
               chat_template=[{"name": "tool_use", "template": "TOOLS {{ tools }}"},
                              {"name": "default", "template": CHATML_TEMPLATE}])
    out["listed"] = listed
    no_template = root / "no_template"
    shutil.copytree(out["llama3"], no_template)
    (no_template / "chat_template.jinja").unlink()
    out["no_template"] = no_template

    # SentencePiece-style (Metaspace) BPE, whose decoder strips the first space: no post-processor
    hf = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(["<unk>", "<s>", "</s>"], byte_level=False),
                                 bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(root / "metaspace")
    out["metaspace"] = root / "metaspace"

    # WordLevel, clean_up_tokenization_spaces=true, and a pad token that tokenizer.json does not know
    words = sorted({w for t in CORPUS for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    wl = Backend(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[CLS]", "[SEP]"] + words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.add_special_tokens(["[UNK]", "[CLS]", "[SEP]"])
    wl.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    hf.save_pretrained(root / "wordlevel")
    _edit_json(root / "wordlevel" / "tokenizer_config.json", clean_up_tokenization_spaces=True, pad_token="[PAD]")
    out["wordlevel"] = root / "wordlevel"

    # named special tokens that tokenizer.json has as a non-special added token / a plain vocab entry / not at all
    odd = root / "odd_specials"
    shutil.copytree(out["llama3"], odd)
    tj = json.loads((odd / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["content"] == "<|eot_id|>":
            t.update(special=False, lstrip=True)
    tj["model"]["vocab"]["<mask>"] = len(tj["model"]["vocab"])
    (odd / "tokenizer.json").write_text(json.dumps(tj))
    _edit_json(odd / "tokenizer_config.json", mask_token="<mask>", unk_token="<unk>")
    out["odd_specials"] = odd
    return out


@pytest.fixture(scope="module")
def pair(dirs):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_tokenizer(dirs[name]), AutoTokenizer.from_pretrained(dirs[name])
        return cache[name]
    return get


def _hf_ids(result):
    return result if isinstance(result, list) else result["input_ids"]  # transformers 5 returns a BatchEncoding


# ---------------------------------------------------------------- encode / decode

@pytest.mark.parametrize("name", ["llama3", "nopp_add_bos", "pp_no_add_bos", "chatml", "metaspace", "wordlevel"])
@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(pair, name, add_special):
    ours, hf = pair(name)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special) == \
            hf(text, add_special_tokens=add_special)["input_ids"], text
    assert ours.encode_batch(TEXTS, add_special_tokens=add_special) == \
        hf(TEXTS, add_special_tokens=add_special)["input_ids"]


def test_bos_comes_from_tokenizer_json_post_processor_not_add_bos_token_flag(pair):
    # transformers 5 drops add_bos_token/add_eos_token from tokenizer_config.json when tokenizer.json exists
    ours, hf = pair("llama3")
    assert ours.encode("Hi")[0] == ours.bos_token_id == hf("Hi")["input_ids"][0]
    ours, hf = pair("nopp_add_bos")
    assert ours.encode("Hi") == ours.encode("Hi", add_special_tokens=False) == hf("Hi")["input_ids"]
    assert ours.bos_token_id not in ours.encode("Hi") and ours.eos_token_id not in ours.encode("Hi")
    ours, hf = pair("pp_no_add_bos")
    assert ours.encode("Hi")[0] == ours.bos_token_id == hf("Hi")["input_ids"][0]


@pytest.mark.parametrize("name", ["llama3", "chatml", "metaspace", "wordlevel"])
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, name, skip):
    ours, hf = pair(name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        for cut in range(len(ids)):  # prefixes that end inside a multi-byte character decode to U+FFFD alike
            assert ours.decode(ids[:cut], skip_special_tokens=skip) == hf.decode(ids[:cut], skip_special_tokens=skip)
    if name in ("llama3", "chatml"):  # byte-level BPE round-trips exactly
        assert all(ours.decode(ours.encode(t)) == t for t in TEXTS if "<|" not in t)


@pytest.mark.parametrize("name", ["llama3", "chatml", "metaspace", "wordlevel"])
def test_vocab_and_special_tokens_match_transformers(pair, name):
    ours, hf = pair(name)
    assert ours.vocab_size == len(hf)
    for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, attr) == getattr(hf, attr), attr
    for token in hf.all_special_tokens:
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token), token
    assert [ours.id_to_token(i) for i in range(len(hf))] == hf.convert_ids_to_tokens(list(range(len(hf))))
    assert ours.token_to_id("no-such-token") is None and ours.id_to_token(len(hf) + 5) is None


def test_decode_cleans_up_spaces_like_transformers_for_non_bpe(pair):
    ours, hf = pair("wordlevel")
    text = "Hello world, this is a small test. The lazy dog!"
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text  # WordLevel alone gives "test ."


def test_named_special_token_missing_from_vocab_is_added_like_transformers(pair):
    ours, hf = pair("wordlevel")
    assert ours.pad_token == "[PAD]" and ours.pad_token_id == hf.pad_token_id == ours.vocab_size - 1 == len(hf) - 1
    assert ours.encode("fox [PAD] dog") == hf("fox [PAD] dog")["input_ids"]


def test_named_special_tokens_registered_as_special_like_transformers(pair):
    ours, hf = pair("odd_specials")
    text = "hi <|eot_id|> x <mask> y <unk>"
    assert ours.encode(text) == hf(text)["input_ids"] and ours.vocab_size == len(hf)
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "hi x  y "
    assert {i: repr(t) for i, t in ours._tok.get_added_tokens_decoder().items()} == \
        {i: repr(t) for i, t in hf.added_tokens_decoder.items()}


def test_special_tokens_given_as_added_token_dicts_and_legacy_map(pair):
    ours, _ = pair("chatml")
    assert ours.eos_token == "<|im_end|>" and ours.bos_token is None and ours.bos_token_id is None
    assert ours.pad_token == "<|end_of_text|>"  # only in special_tokens_map.json


# ---------------------------------------------------------------- chat templates

def _both(pair, name, messages=MESSAGES, **kw):
    ours, hf = pair(name)
    return (ours.apply_chat_template(messages, **kw),
            hf.apply_chat_template(messages, tokenize=False, **kw))


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers_llama3(pair, gen):
    a, b = _both(pair, "llama3", add_generation_prompt=gen)
    assert a == b and a.startswith("<|begin_of_text|><|start_header_id|>system")


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers_chatml_from_tokenizer_config(pair, gen):
    a, b = _both(pair, "chatml", add_generation_prompt=gen)
    assert a == b and a.endswith("<|im_start|>assistant\n" if gen else "<|im_end|>\n")


def test_chat_template_list_in_tokenizer_config_uses_default(pair):
    a, b = _both(pair, "listed", add_generation_prompt=True)
    assert a == b and a.startswith("<|im_start|>system")


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers_namespace_loop_tojson(pair, gen):
    tools = [{"type": "function", "function": {"name": "날씨", "description": "<weather> & more"}}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "multi-part 😀"}]}]
    for messages, kw in ((MESSAGES, {}), (MESSAGES + parts, {"tools": tools})):
        a, b = _both(pair, "fancy", messages, add_generation_prompt=gen, **kw)
        assert a == b
    assert "안녕하세요" in a and "<b>helpful</b> & \\\"kind\\\"" in a and '[\n  {\n    "type": "function"' in a


def test_chat_template_raise_exception_raises_in_both(pair):
    ours, hf = pair("strict")
    bad = MESSAGES[:1] + [{"role": "robot", "content": "beep"}]
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja.*Unknown role: robot"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        hf.apply_chat_template(bad, tokenize=False)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False)


def test_transformers_saves_template_as_chat_template_jinja(dirs, pair):
    assert (dirs["llama3"] / "chat_template.jinja").read_text() == LLAMA3_TEMPLATE
    assert "chat_template" not in json.loads((dirs["llama3"] / "tokenizer_config.json").read_text())
    assert pair("llama3")[0].chat_template == LLAMA3_TEMPLATE
    assert pair("chatml")[0].chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_chat_template_tokenize_matches_transformers_ids(pair, name):
    ours, hf = pair(name)
    ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert ids == _hf_ids(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    assert ids.count(ours.token_to_id("<|begin_of_text|>")) == (1 if name == "llama3" else 0)  # no second BOS


def test_chat_template_compiled_once(pair):
    ours, _ = pair("llama3")
    ours.apply_chat_template(MESSAGES)
    compiled = ours._compiled
    ours.apply_chat_template(MESSAGES[:2])
    assert ours._compiled is compiled


# ---------------------------------------------------------------- streaming

STREAM_TEXT = "스트리밍 테스트: 한국어 문장과 이모지 😀🎉👩‍👩‍👧 mixed with English, 中文 too."


@pytest.mark.parametrize("name", ["llama3", "metaspace", "wordlevel"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_pieces_concatenate_to_decode(pair, name, skip):
    ours, _ = pair(name)
    special = " <|eot_id|>" if name == "llama3" else ""
    ids = ours.encode(STREAM_TEXT + special + " Hello world, this is a test. The end!")
    dec = ours.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    tail = dec.flush()
    assert "".join(pieces) + tail == ours.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces + [tail])
    if name == "llama3":  # byte-level BPE splits Korean/emoji bytes over tokens: text must be held back
        assert "" in pieces


def test_stream_decoder_decodes_bounded_window(pair, monkeypatch):
    ours, _ = pair("llama3")
    ids = ours.encode(STREAM_TEXT * 30, add_special_tokens=False)
    seen = []
    real = ours.decode
    monkeypatch.setattr(ours, "decode", lambda window, **kw: seen.append(len(window)) or real(window, **kw))
    dec = ours.stream_decoder()
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == real(ids) and len(ids) > 500 and max(seen) <= 16


# ---------------------------------------------------------------- errors

def test_missing_tokenizer_json_raises_naming_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="directory not found"):
        load_tokenizer(tmp_path / "nope")


def test_malformed_tokenizer_json_raises_naming_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE",')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: malformed JSON") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizers file"):
        load_tokenizer(tmp_path)


def test_malformed_tokenizer_config_raises_naming_file(dirs, tmp_path):
    shutil.copy(dirs["llama3"] / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: malformed JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 7}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 7}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template"):
        load_tokenizer(tmp_path)


def test_missing_chat_template_raises(pair):
    ours, _ = pair("no_template")
    assert ours.chat_template is None and ours.encode("ok")  # the tokenizer itself is usable
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)


def test_chat_template_syntax_error_raises_naming_file(dirs, tmp_path):
    shutil.copytree(dirs["llama3"], tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja: chat template syntax error at line 1"):
        load_tokenizer(tmp_path / "t").apply_chat_template(MESSAGES)


@pytest.mark.parametrize("messages, field", [
    ("hello", "chat messages"),
    ([], "chat messages"),
    (["hello"], r"chat messages\[0\]"),
    ([{"content": "hi"}], r"chat messages\[0\]\.role"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], r"chat messages\[1\]\.role"),
    ([{"role": "user"}], r"chat messages\[0\]\.content"),
    ([{"role": "user", "content": 42}], r"chat messages\[0\]\.content"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"chat messages\[0\]\.content\[0\]"),
])
def test_malformed_messages_raise_naming_field(pair, messages, field):
    ours, _ = pair("llama3")
    with pytest.raises(TokenizerError, match=field):
        ours.apply_chat_template(messages)
