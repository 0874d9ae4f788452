"""GGUF export and import (lmfoundry.checkpoint.gguf) against independent readers: llama.cpp's own
`gguf` library, transformers' GGUF loader (model and tokenizer), and the GGML block formats' error bounds."""
import json
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmfoundry import load_model, load_tokenizer, read_checkpoint  # noqa: E402
from lmfoundry.checkpoint import convert, write_checkpoint  # noqa: E402
from lmfoundry.checkpoint.gguf import export_gguf, gguf_metadata, import_gguf, permute_qk  # noqa: E402
from lmfoundry.cli import main  # noqa: E402
from lmfoundry.demo import make_demo_checkpoint  # noqa: E402
from lmfoundry.errors import CheckpointError, ConfigError  # noqa: E402

from conftest import hf_llama  # noqa: E402

SAMPLE = "Depth up-scaling stacks two copies. 언어 모델은 다음 토큰을 예측합니다! 3 + 4 = 7\n  spaces"


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def rewrite(src, dst, meta=None, tensor=None):
    """Copy a GGUF with llama.cpp's writer, changing metadata values or one tensor's (data, type)."""
    r = gguf.GGUFReader(src)
    meta = meta or {}
    w = gguf.GGUFWriter(dst, meta.get("general.architecture", "llama"))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        if meta.get(key, 0) is not None:
            w.add_key_value(key, meta.get(key, f.contents()), f.types[0], sub_type=sub)
    for key, value in meta.items():
        if key not in r.fields and value is not None:
            w.add_array(key, value)
    for t in r.tensors:
        data, qtype = (tensor[1], tensor[2]) if tensor and t.name == tensor[0] else (t.data, t.tensor_type)
        w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-saved Llama (GQA, random norms) with lmfoundry's demo tokenizer beside it."""
    root = tmp_path_factory.mktemp("gguf")
    demo = make_demo_checkpoint(root / "demo")
    model = hf_llama(vocab_size=512, bos_token_id=1, eos_token_id=4, pad_token_id=0)
    model.save_pretrained(root / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, root / "llama" / name)
    return root / "llama", model


def test_export_writes_llama_metadata_tokenizer_and_permuted_qk(demo_dir, tmp_path):
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant="f32", progress=False)
    meta, tensors = fields(out)
    cfg, _, loaders = read_checkpoint(demo_dir)
    tok = load_tokenizer(demo_dir)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    sizes = ("block_count", "embedding_length", "feed_forward_length")
    assert [meta[f"llama.{k}"] for k in sizes] == [2, 64, 128]
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert meta["tokenizer.ggml.tokens"][tok.token_to_id("<|im_end|>")] == "<|im_end|>"
    assert meta["tokenizer.ggml.token_type"][tok.token_to_id("<|im_end|>")] == 3      # control
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 4, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert len(tensors) == len(cfg.shapes())
    assert list(tensors["token_embd.weight"].shape) == [64, 512]     # GGUF lists dims innermost first
    # llama.cpp's llama rotates adjacent pairs: GGUF row 2j of a head is HF row j, row 2j+1 is HF row j + 8
    q = loaders["layers.1.attn.q.weight"]().numpy()
    g = tensors["blk.1.attn_q.weight"].data
    head = 2
    for j in range(8):
        np.testing.assert_array_equal(g[head * 16 + 2 * j], q[head * 16 + j])
        np.testing.assert_array_equal(g[head * 16 + 2 * j + 1], q[head * 16 + j + 8])
    np.testing.assert_array_equal(permute_qk(permute_qk(torch.from_numpy(q), 4), 4, inverse=True).numpy(), q)


@pytest.mark.parametrize("quant,tol", [("f32", 1e-4), ("f16", 2e-2)])
def test_transformers_gguf_loader_reads_our_export_with_the_same_logits(hf_dir, tmp_path, quant, tol):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src, model = hf_dir
    export_gguf(src, tmp_path / "m.gguf", quant=quant, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, theirs(ids).logits
    assert (want - got).abs().max().item() < tol
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    gguf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert gguf_tok(SAMPLE).input_ids == hf_tok(SAMPLE).input_ids == load_tokenizer(src).encode(SAMPLE)


@pytest.mark.parametrize("preset,fmt", [("tiny", None), ("tiny-openelm", None), ("tiny-exaone", "exaone")])
def test_round_trip_through_f32_gguf_is_exact(tmp_path, preset, fmt):
    src = make_demo_checkpoint(tmp_path / "src", preset=preset)
    if fmt:
        src = convert(src, tmp_path / fmt, to=fmt)
    out = export_gguf(src, tmp_path / "m.gguf", quant="f32", progress=False)
    back = import_gguf(out, tmp_path / "back", to=fmt)
    (cfg_a, fmt_a, a), (cfg_b, fmt_b, b) = read_checkpoint(src), read_checkpoint(back)
    assert cfg_a == cfg_b and fmt_a.name == fmt_b.name
    assert all(torch.equal(a[n](), b[n]()) for n in a)
    assert json.loads((src / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    ta, tb = load_tokenizer(src), load_tokenizer(back)
    assert ta.encode(SAMPLE) == tb.encode(SAMPLE) and ta.decode(ta.encode(SAMPLE)) == tb.decode(tb.encode(SAMPLE))
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "안녕?"}]
    assert ta.apply_chat_template(chat, add_generation_prompt=True) == \
        tb.apply_chat_template(chat, add_generation_prompt=True)
    assert (ta.bos_token, ta.eos_token, ta.pad_token) == (tb.bos_token, tb.eos_token, tb.pad_token)
    if preset == "tiny-openelm":
        meta, tensors = fields(out)
        assert meta["general.architecture"] == "openelm" and "output.weight" not in tensors
        assert meta["openelm.attention.head_count"] == cfg_a.n_heads and "blk.0.attn_qkv.weight" in tensors


@pytest.mark.parametrize("quant,step", [("q8_0", 127), ("q4_0", 8)])
def test_quantized_import_is_within_the_block_formats_error_bound(demo_dir, tmp_path, quant, step):
    """Q8_0: x = d*q with d = amax/127 per 32-value block; Q4_0: d = amax/8 (the signed extreme maps to
    -8, the other side clips at +7). So |x - x'| <= amax_block/step, plus fp16 rounding of d."""
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant=quant, progress=False)
    _, tensors = fields(out)
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == quant.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"    # 1-D tensors stay F32
    (_, _, a), (_, _, b) = read_checkpoint(demo_dir), read_checkpoint(out)
    for name in a:
        x, y = a[name](), b[name]()
        if x.dim() == 1:
            assert torch.equal(x, y)
            continue
        blocks, err = x.reshape(-1, 32), (x - y).reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) / step * 1.002 + 1e-7
        assert bool((err.abs() <= bound).all()), name
        assert (err.abs().max() > 0) or quant == "q8_0"
    model, ref = load_model(out), load_model(demo_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        diff = (model(ids) - ref(ids)).abs().max().item()
    assert diff < (0.05 if quant == "q8_0" else 0.5)


def test_bf16_export_rounds_like_the_gguf_library(demo_dir, tmp_path):
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant="bf16", progress=False)
    _, tensors = fields(out)
    _, _, a = read_checkpoint(demo_dir)
    want = gguf.quants.quantize(a["layers.0.mlp.down.weight"]().numpy(), gguf.GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"].data, want)
    assert load_model(out).dtype == torch.bfloat16


def test_llama3_rope_scaling_travels_as_rope_freqs_and_comes_back(demo_dir, tmp_path):
    cfg, _, loaders = read_checkpoint(demo_dir)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    src = write_checkpoint(tmp_path / "l3", cfg.replace(rope_scaling=rs, rope_theta=500000.0), loaders,
                           tokenizer_from=demo_dir)
    out = export_gguf(src, tmp_path / "m.gguf", progress=False)
    _, tensors = fields(out)
    assert "rope_freqs.weight" in tensors
    back, _, _ = read_checkpoint(out)
    assert back.rope_scaling == rs
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        assert torch.equal(load_model(src)(ids), load_model(out)(ids))


def test_solar_pro_is_refused_with_the_reason(tmp_path):
    src = make_demo_checkpoint(tmp_path / "sp", preset="tiny-solar-pro")
    with pytest.raises(ConfigError, match="skip connections.*no llama.cpp equivalent"):
        export_gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_quant_type_the_library_cannot_write_is_refused_with_the_list(demo_dir, tmp_path):
    with pytest.raises(ConfigError, match="q4_k_m.*cannot quantize to Q4_K.*can write: f32, f16, bf16, q8_0, q4_0"):
        export_gguf(demo_dir, tmp_path / "m.gguf", quant="q4_k_m")
    with pytest.raises(ConfigError, match="--quant q3.*can write"):
        export_gguf(demo_dir, tmp_path / "m.gguf", quant="q3")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_and_tensor_type_are_refused_by_name(demo_dir, tmp_path):
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant="f32", progress=False)
    qwen = rewrite(out, tmp_path / "qwen.gguf", meta={"general.architecture": "qwen2"})
    with pytest.raises(CheckpointError, match="architecture 'qwen2' is not supported; supported: llama"):
        read_checkpoint(qwen)
    rows = np.zeros((64, 4 * 40), np.uint8)       # Q8_1: 40 bytes per 32 values; ffn_down is 64 x 128
    q81 = rewrite(out, tmp_path / "q81.gguf", tensor=("blk.0.ffn_down.weight", rows, gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(CheckpointError, match="blk.0.ffn_down.weight is Q8_1, which the gguf library cannot"):
        read_checkpoint(q81)


def test_truncated_or_foreign_file_is_refused_with_its_name(demo_dir, tmp_path):
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant="f32", progress=False)
    data = out.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(CheckpointError, match="text.gguf: not a valid GGUF file"):
        read_checkpoint(tmp_path / "text.gguf")


def test_cli_converts_both_ways_and_commands_take_a_gguf(demo_dir, tmp_path, capsys):
    gguf_path = tmp_path / "m.gguf"
    assert main(["convert", str(demo_dir), str(gguf_path), "--quant", "q8_0"]) == 0
    assert main(["convert", str(demo_dir), str(gguf_path)]) == 1          # exists: no --force
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(gguf_path), str(tmp_path / "back"), "--to", "llama", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "bf16.gguf")]) == 0   # keeps the dtype
    assert fields(tmp_path / "bf16.gguf")[1]["blk.0.ffn_up.weight"].tensor_type.name == "BF16"
    assert main(["info", str(gguf_path)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["generate", str(gguf_path), "Depth", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Depth")
    blob = tmp_path / "blobs" / ("sha256-" + "0" * 64)     # Ollama's store: a GGUF without a suffix
    blob.parent.mkdir()
    shutil.copy(gguf_path, blob)
    assert main(["convert", str(blob), str(tmp_path / "from-ollama"), "--to", "llama"]) == 0
    assert torch.equal(load_model(blob).embed.weight, load_model(tmp_path / "from-ollama").embed.weight)


def test_sentencepiece_vocabulary_encodes_like_transformers_gguf_tokenizer(demo_dir, tmp_path):
    """tokenizer.ggml.model = llama (Llama 2, Mistral, SOLAR GGUFs): merges implied by the scores,
    bytes as <0xNN>. Texts start without a space: there transformers 5 (Metaspace) and llama.cpp
    (always a space prefix, as Llama 2's tokenizer.json does) differ, and we follow llama.cpp."""
    transformers = pytest.importorskip("transformers")
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant="f32", progress=False)
    pieces = ["▁", "t", "h", "e", "a", "c", "n", "i", "s", "▁t", "he", "▁the", "at", "▁c", "▁cat", "in",
              "▁in", "▁a", "▁h", "▁hat", "is", "▁is", "▁at", "▁thin"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.merges": None, "tokenizer.ggml.pre": None, "tokenizer.ggml.eot_token_id": None,
            "tokenizer.ggml.padding_token_id": None, "tokenizer.ggml.eos_token_id": 2}
    spm = rewrite(out, tmp_path / "spm.gguf", meta=meta)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    ours = load_tokenizer(spm)
    for text in ["the cat is at the hat", "thin cats in the hat  ", "안녕 the", "hat\nthe", "athe"]:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text


def test_metadata_parser_agrees_with_gguf_reader_and_refuses_a_lying_length(demo_dir, tmp_path):
    out = export_gguf(demo_dir, tmp_path / "m.gguf", quant="q8_0", progress=False)
    meta, infos = gguf_metadata(out)
    r = gguf.GGUFReader(out)
    theirs = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == theirs.keys()
    for key, value in theirs.items():
        assert meta[key] == pytest.approx(value) if isinstance(value, float) else meta[key] == value, key
    assert [(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape)), t.n_bytes, t.data_offset)
            for t in r.tensors] == [tuple(i) for i in infos.values()]
    data = bytearray(out.read_bytes())
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8   # past the array and element types
    data[at:at + 8] = (2**60).to_bytes(8, "little")
    (tmp_path / "lie.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="lie.gguf: not a valid GGUF file .an array runs past the end"):
        read_checkpoint(tmp_path / "lie.gguf")


@pytest.mark.parametrize("preset", ["tiny", "tiny-openelm"])
def test_llama_cpp_runs_our_export_like_lmfoundry(tmp_path, preset):
    """Optional (llama-cpp-python compiles llama.cpp on install, so it is not in the test extra):
    llama.cpp itself tokenizes like us and gives the same logits (and greedy tokens) on our f32
    export, for its `llama` (q/k permuted) and `openelm` (per-layer sizes) architectures."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    src = make_demo_checkpoint(tmp_path / "src", preset=preset)
    out = export_gguf(src, tmp_path / "m.gguf", quant="f32", progress=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, seed=0)
    tok, model = load_tokenizer(src), load_model(src)
    assert llm.tokenize(SAMPLE.encode(), add_bos=True, special=True) == tok.encode(SAMPLE)
    prompt = tok.encode("Depth up-scaling copies a base model")
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        assert (theirs - model(torch.tensor([prompt]))[0]).abs().max().item() < 1e-3
    if preset == "tiny":
        from lmfoundry.generate import generate
        (want,) = generate(model, [prompt], max_new_tokens=8, temperature=0, stop_ids=())
        llm.reset()
        got = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            got.append(t)
            if len(got) == len(want.tokens):
                break
        assert got == want.tokens
