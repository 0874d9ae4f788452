"""GGUF (llama.cpp, Ollama) out and in, with llama.cpp's own Python library `gguf` (the `gguf` extra).

    export_gguf(src, "out.gguf", quant="q8_0")   streams tensor by tensor from read_checkpoint; never builds a model
    read_gguf("m.gguf")                          -> ModelConfig, Format, lazy canonical tensors (dequantized on load)
    import_gguf("m.gguf", "out-dir", to="llama") a normal checkpoint directory: config.json, tokenizer.json, weights
    gguf_tokenizer("m.gguf")                     -> lmfoundry Tokenizer rebuilt from the file's vocabulary
    gguf_metadata("m.gguf")                      -> metadata dict, tensor name -> TensorInfo (checked, cached)

What llama.cpp expects (its convert_hf_to_gguf.py and src/llama-model.cpp, read to learn):
- Llama, Mistral, SOLAR and EXAONE 3 are written as architecture `llama`. llama.cpp's `llama` rotates
  adjacent pairs (NORM RoPE) while Hugging Face checkpoints rotate halves, so the rows of q and k are
  permuted per head on the way out and back on the way in. OpenELM is `openelm` (per-layer heads and
  FFN widths as arrays, fused attn_qkv, q/k norms, tied output) and EXAONE files from llama.cpp are
  `exaone`; both rotate halves (NEOX), so nothing is permuted.
- The tokenizer is metadata: tokens by id, merges "a b", token types (1 normal, 3 control,
  4 user-defined, 5 unused), special ids, the pre-tokenizer's name, the chat template.
- Solar Pro's weighted skip connections have no llama.cpp equivalent, so such models are refused.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, TokenizerError
from .formats import FORMATS, Format, refusal, weight_plan

# ----- canonical name -> GGUF name, per architecture (a tuple: fused along dim 0) ----------

_BLOCK = {
    "layers.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attn.o.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.mlp_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down.weight": "blk.{i}.ffn_down.weight",
}
_ENDS = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_QKV = {"layers.{i}.attn.q.weight": "blk.{i}.attn_q.weight", "layers.{i}.attn.k.weight": "blk.{i}.attn_k.weight",
        "layers.{i}.attn.v.weight": "blk.{i}.attn_v.weight"}
_LLAMA_NAMES = {**_ENDS, **_BLOCK, **_QKV}
_OPENELM_NAMES = {**_ENDS, **_BLOCK, "layers.{i}.attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
                  "layers.{i}.attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
                  ("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight", "layers.{i}.attn.v.weight"):
                      "blk.{i}.attn_qkv.weight"}


def _table(names: dict) -> dict:
    """GGUF name -> canonical name(s), the shape formats.weight_plan reads."""
    return {gguf: ours for ours, gguf in names.items()}


# GGUF architecture -> (weight table as a Format, lmfoundry format of the config, permute q/k)
ARCHS = {
    "llama": (Format("gguf-llama", "llama", "llama", _table(_LLAMA_NAMES)), "llama", True),
    "exaone": (Format("gguf-exaone", "exaone", "exaone", _table(_LLAMA_NAMES)), "exaone", False),
    "openelm": (Format("gguf-openelm", "openelm", "openelm", _table(_OPENELM_NAMES)), "openelm", False),
}
EXTRA_TENSORS = ("rope_freqs.weight",)   # computed tensors llama.cpp adds; they carry config, not weights

# --quant name -> GGML type name; `q4_k_m` is llama.cpp's Q4_K/Q6_K mix
QUANTS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
          "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k_m": "Q4_K"}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}

# Hugging Face pre-tokenizer regexes <-> llama.cpp pre-tokenizer names (byte-level BPE)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": GPT2_SPLIT, "default": GPT2_SPLIT, "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT,
                  "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF needs the optional 'gguf' extra (llama.cpp's Python library): "
                              "pip install 'lmfoundry[gguf]'") from None
    return gguf


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def is_gguf(path) -> bool:
    """A .gguf path, or a file that starts with GGUF's magic (Ollama's blobs/sha256-... have no suffix)."""
    if str(path).lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:   # a directory, or nothing there
        return False


def permute_qk(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Hugging Face rotate-half rows <-> llama.cpp's interleaved pairs, per head."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    split = (n_heads, half, 2, cols) if inverse else (n_heads, 2, half, cols)
    return w.reshape(split).transpose(1, 2).reshape(rows, cols)


# =============================================================================== export

def quant_types() -> dict[str, str]:
    """--quant name -> why it cannot be written ('' when the gguf library can produce it)."""
    gguf = require_gguf()
    out = {}
    for name, type_name in QUANTS.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        try:
            gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
            out[name] = "" if type_name in FILE_TYPES else "no single-type file"
        except NotImplementedError:
            out[name] = f"the gguf library {_version()} cannot quantize to {type_name}"
    return out


def _gguf_arch(cfg: ModelConfig, fmt: Format, src) -> str:
    if cfg.has_skips or any(cfg.skip_save):
        raise ConfigError(f"cannot export {src} to GGUF: Solar Pro's weighted layer skip connections (bskcn) have "
                          "no llama.cpp equivalent (its graphs cannot save a layer's hidden state and blend it back "
                          "in later), so the file would compute a different model")
    if fmt.name != "openelm" and cfg.uniform and not cfg.qk_norm:
        return "llama"
    why = [w for bad, w in ((not cfg.qk_norm, "no q/k norms"), (not cfg.tie_embeddings, "untied embeddings"),
                            (cfg.rope_scaling is not None, "RoPE scaling"), (cfg.norm_eps != 1e-6, "norm eps != 1e-6"))
           if bad]
    if why:
        raise ConfigError(f"cannot export {src} to GGUF: per-layer sizes or q/k norms need llama.cpp's `openelm` "
                          f"architecture, which cannot represent {', '.join(why)}")
    return "openelm"


def _rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling: unscaled / scaled inverse frequency, per dimension pair."""
    from ..model import rope_inv_freq
    return (rope_inv_freq(cfg.replace(rope_scaling=None)) / rope_inv_freq(cfg)).numpy().astype(np.float32)


def _metadata(w, arch: str, cfg: ModelConfig, name: str):
    """Architecture keys, written with gguf-py's typed adders (u32 counts, f32 floats)."""
    per_layer = arch == "openelm"
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim if per_layer else cfg.ffn_dim[0])
    w.add_head_count(cfg.n_heads if per_layer else cfg.n_heads[0])
    w.add_head_count_kv(cfg.n_kv_heads if per_layer else cfg.n_kv_heads[0])
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if per_layer or cfg.head_dim * cfg.n_heads[0] != cfg.dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    rs = cfg.rope_scaling
    if rs is not None and rs["rope_type"] == "linear":
        w.add_rope_scaling_type(require_gguf().RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    elif rs is not None:   # llama3: the factors travel as the rope_freqs tensor
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])


def export_gguf(src, out, quant: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write checkpoint `src` (a directory, or a .gguf) as one GGUF file at `out`, tensor by tensor.

    quant: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (q4_k_m is refused: the gguf library cannot
    quantize k-quants); None keeps the checkpoint's dtype. 1-D tensors (norms) stay F32; a 2-D
    tensor whose rows are not a multiple of the block size falls back to F16, as llama.cpp does.
    """
    from . import read_checkpoint
    gguf = require_gguf()
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --force / overwrite=True to replace it)")
    cfg, fmt, loaders = read_checkpoint(src)
    arch = _gguf_arch(cfg, fmt, src)
    table, _, permute = ARCHS[arch]
    quant = quant or _source_quant(src, loaders)
    can = quant_types()
    if can.get(quant) != "":
        known = ", ".join(q for q, why in can.items() if not why)
        reason = f" ({can[quant]})" if quant in can else ""
        raise ConfigError(f"--quant {quant}{reason} cannot be written; lmfoundry can write: {known}"
                          + ("; for k-quants write f16 and run llama.cpp's llama-quantize" if "_k" in quant else ""))
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        warnings.warn(f"{src}: llama.cpp's llama has no sliding window; the GGUF attends to the whole context "
                      f"(identical up to {cfg.sliding_window} tokens)", stacklevel=2)
    qtype = gguf.GGMLQuantizationType[QUANTS[quant]]
    plan = weight_plan(cfg, table)
    shapes = cfg.shapes()

    def spec(name, parts):   # (GGML type, logical shape) of one tensor
        shape = (sum(shapes[p][0] for p in parts), *shapes[parts[0]][1:])
        t = qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        if shape[-1] % gguf.GGML_QUANT_SIZES[t][0]:
            t = gguf.GGMLQuantizationType.F16
        return t, shape

    specs = {name: spec(name, parts) for name, parts in plan.items()}
    extra = {"rope_freqs.weight": _rope_freqs(cfg)} if cfg.rope_scaling and \
        cfg.rope_scaling["rope_type"] == "llama3" else {}

    def encode(name) -> np.ndarray:
        if name in extra:
            return extra[name]
        parts = [loaders[p]() for p in plan[name]]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            layer = int(name.split(".")[1])
            t = permute_qk(t, (cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)[layer])
        return _encode(t, specs[name][0], gguf)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, arch)
        _metadata(w, arch, cfg, Path(src).name.removesuffix(".gguf"))
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[QUANTS[quant]]])
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(w, src, cfg)
        total = 0
        for name, (t, shape) in list(specs.items()) + [(n, (gguf.GGMLQuantizationType.F32, a.shape))
                                                      for n, a in extra.items()]:
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, t))
            w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=t)
            total += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_pipelined(w, list(specs) + list(extra), encode, total, f"GGUF {quant}", progress)
        w.close()
        os.replace(tmp, out)
    finally:
        if w is not None:
            w.close()
        if tmp.exists():
            tmp.unlink()
    return out


def _source_quant(src, loaders) -> str:
    """The checkpoint's own dtype as a --quant name: config.json's torch_dtype, else the embedding's."""
    config = Path(src) / "config.json"
    name = None
    if config.is_file():
        hf = json.loads(config.read_text(encoding="utf-8"))
        name = hf.get("torch_dtype") or hf.get("dtype")
    if not isinstance(name, str):
        name = str(loaders["embed.weight"]().dtype).removeprefix("torch.")
    return {"float16": "f16", "bfloat16": "bf16"}.get(name, "f32")


def _write_pipelined(w, names: list[str], encode, total: int, desc: str, progress: bool):
    """Write tensors in order while the next one is read and encoded on a second thread. Held at
    once: the tensor being written and the next one being made, at most two of the largest."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    with ThreadPoolExecutor(1) as pool, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                              disable=not progress) as bar:
        pending = pool.submit(encode, names[0])
        for k in range(len(names)):
            data = pending.result()
            pending = pool.submit(encode, names[k + 1]) if k + 1 < len(names) else None
            w.write_tensor_data(data)
            bar.update(data.nbytes)
            del data


def _encode(t: torch.Tensor, qtype, gguf) -> np.ndarray:
    """One tensor in GGML type `qtype`: plain casts in torch (bf16 rounds to nearest even, as
    gguf-py does), block quantization with gguf-py's quantizers."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(t.to(torch.float32).numpy(), qtype)


# ----- tokenizer out -------------------------------------------------------------------

def _pre_tokenizer_name(pre: dict | None, where: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer in tokenizer.json."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if byte_level and not splits and byte_level[0].get("use_regex", True):
        if byte_level[0].get("add_prefix_space"):
            raise TokenizerError(f"{where}: a byte-level pre-tokenizer with add_prefix_space has no llama.cpp name")
        return "gpt-2"
    for name, regex in PRE_TOKENIZERS.items():
        if byte_level and splits == [regex]:
            return name
    raise TokenizerError(f"{where}: pre-tokenizer {json.dumps(pre)[:160]} matches none llama.cpp knows "
                         f"(byte-level BPE with the GPT-2, Llama 3 or Qwen2 split); GGUF export needs one")


def _tokenizer_metadata(w, src, cfg: ModelConfig):
    """tokenizer.ggml.* and tokenizer.chat_template from src's tokenizer files (or GGUF metadata)."""
    from ..tokenizer import load_tokenizer
    tok = load_tokenizer(src)
    where = src if is_gguf(src) else Path(src) / "tokenizer.json"
    spec = json.loads(tokenizer_files(src)["tokenizer.json"] if is_gguf(src) else where.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(f"{where}: only byte-level BPE tokenizers (GPT-2 / Llama 3 style) can be written to "
                             f"GGUF yet; this one is {model.get('type')}"
                             + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""))
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), where)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    n = max(cfg.vocab_size, tok.vocab_size)
    if n > cfg.vocab_size:
        raise TokenizerError(f"{where}: {tok.vocab_size} tokens, more than the model's vocab_size {cfg.vocab_size}")
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n   # llama.cpp's filler for unused rows
    for piece, i in model["vocab"].items():
        tokens[i], types[i] = piece, NORMAL
    for i, a in added.items():
        tokens[i], types[i] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    probe = tok.encode("a", add_special_tokens=True)
    plain = tok.encode("a", add_special_tokens=False)
    w.add_add_bos_token(len(probe) > len(plain) and probe[0] == tok.bos_token_id)
    w.add_add_eos_token(len(probe) > len(plain) and probe[-1] == tok.eos_token_id)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    eos = [e for e in eos if e is not None]
    if len(eos) > 3:
        warnings.warn(f"{src}: GGUF holds three end-of-generation ids (eos, eot, eom); kept {eos[:3]}", stacklevel=3)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else tok.pad_token_id   # OpenELM's config has none
    for add, value in ((w.add_bos_token_id, cfg.bos_token_id), (w.add_pad_token_id, pad),
                       *zip((w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id), eos)):
        if value is not None:
            add(value)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


# =============================================================================== import

def _tensor_infos(path: str, meta: dict, raw: list, header_end: int, size: int) -> dict:
    """TensorInfo per tensor, after checking its type, shape and bytes against the file."""
    gguf = require_gguf()
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path}: general.alignment {align!r} is not a power of two")
    start = -(-header_end // align) * align
    infos = {}
    for name, dims, type_id, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name} has unknown GGML type {type_id}") from None
        n = math.prod(dims)
        if dims and dims[0] % block or n * type_size // block > size or start + offset + n * type_size // block > size:
            raise CheckpointError(f"{path}: tensor {name} points outside the file or has a bad shape (truncated?)")
        if name in infos:
            raise CheckpointError(f"{path}: tensor {name} appears twice")
        infos[name] = TensorInfo(name, qtype, tuple(reversed(dims)), n * type_size // block, start + offset)
    return infos


def gguf_metadata(path) -> tuple[dict, dict]:
    """(metadata, tensor infos) of a GGUF file, parsed once per file version (loading a model reads
    them for the weights and again for the tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    stat = path.stat()
    return _parse(str(path), stat.st_size, stat.st_mtime_ns)


class TensorInfo(NamedTuple):
    name: str
    tensor_type: object          # gguf.GGMLQuantizationType
    shape: tuple[int, ...]       # numpy / torch order (GGUF stores dims innermost first)
    n_bytes: int
    data_offset: int             # from the start of the file


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@functools.lru_cache(maxsize=2)
def _parse(path: str, size: int, mtime_ns: int) -> tuple[dict, dict]:
    """(metadata, tensor infos) of a GGUF file (spec: ggml's docs/gguf.md), read with plain struct
    unpacking over a memory map: gguf-py's reader makes a numpy view per vocabulary string, which
    takes seconds for a 128k-token vocabulary. The file is untrusted input (Ollama's CVE-2026-7482):
    every length, count, type and offset is checked against the file before it is used."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else nullcontext(b"") as m:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise CheckpointError(f"{path}: not a valid GGUF file (truncated in its header)")
            (v,) = struct.unpack_from(fmt, m, pos)
            pos += n
            return v

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise CheckpointError(f"{path}: not a valid GGUF file (a string runs past the end)")
            pos += n
            try:
                return m[pos - n:pos].decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{path}: not a valid GGUF file (a string is not UTF-8)") from None

        def value(vtype: int):
            nonlocal pos
            if vtype == _STRING:
                return string()
            if vtype in _SCALARS:
                return take(_SCALARS[vtype])
            if vtype != _ARRAY:
                raise CheckpointError(f"{path}: not a valid GGUF file (unknown value type {vtype})")
            etype, count = take("<I"), take("<Q")
            if etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype])
                if pos + count * width > size:
                    raise CheckpointError(f"{path}: not a valid GGUF file (an array runs past the end)")
                out = np.frombuffer(m, np.dtype(_SCALARS[etype]), count, pos).tolist()
                pos += count * width
                return out
            if count > size - pos:   # every element takes at least a byte
                raise CheckpointError(f"{path}: not a valid GGUF file (an array runs past the end)")
            return [value(etype) for _ in range(count)]

        if size < 24 or m[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a valid GGUF file (no GGUF magic; big-endian files are not read)")
        pos = 4
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3) or n_tensors > size or n_kv > size:
            raise CheckpointError(f"{path}: not a valid GGUF file (version {version}, {n_tensors} tensors)")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        raw = []
        for _ in range(n_tensors):
            name, n_dims = string(), take("<I")
            if n_dims > 4:
                raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 4)")
            dims = [take("<Q") for _ in range(n_dims)]
            raw.append((name, dims, take("<I"), take("<Q")))
    return meta, _tensor_infos(path, meta, raw, pos, size)


def _config(meta: dict, tensors: dict, path) -> tuple[ModelConfig, str]:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")

    def k(key, default=KeyError):
        v = meta.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise CheckpointError(f"{path}: missing GGUF key {arch}.{key}")
        return v

    dim, heads = k("embedding_length"), k("attention.head_count")
    head_dim = k("attention.key_length", None) or dim // (heads if isinstance(heads, int) else heads[0])
    if k("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count "
                              f"{k('rope.dimension_count')} of head size {head_dim}) are not supported")
    ids = {n: meta.get(f"tokenizer.ggml.{n}_token_id") for n in ("bos", "eos", "eot", "eom", "padding")}
    eos = list(dict.fromkeys(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None))
    fields = dict(vocab_size=tensors["token_embd.weight"][0], dim=dim, n_layers=k("block_count"), n_heads=heads,
                  n_kv_heads=k("attention.head_count_kv", heads), ffn_dim=k("feed_forward_length"),
                  head_dim=head_dim, norm_eps=_f32(k("attention.layer_norm_rms_epsilon")),
                  rope_theta=_f32(k("rope.freq_base", 10000.0)), max_seq_len=k("context_length"),
                  tie_embeddings="output.weight" not in tensors, qk_norm=arch == "openelm",
                  bos_token_id=ids["bos"], eos_token_id=eos[0] if len(eos) == 1 else eos or None,
                  pad_token_id=ids["padding"])
    scaling = k("rope.scaling.type", "none")
    if scaling == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": _f32(k("rope.scaling.factor"))}
    elif scaling not in ("none", ""):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (linear and llama3 are)")
    try:
        cfg = ModelConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, arch


def _f32(value) -> float:
    """A float32 from the file as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _llama3_scaling(cfg: ModelConfig, factors: np.ndarray, orig: int, path) -> ModelConfig:
    """The llama3 rope_scaling whose per-pair factors are `factors` (llama.cpp stores only those).
    In between the two thresholds 1/factor_i = (1-s)/factor + s with s linear in orig/wavelength;
    a line through those points gives low_freq_factor and high_freq_factor."""
    from ..model import rope_inv_freq
    f = factors.astype(np.float64)
    factor = float(f.max())
    wavelen = 2 * math.pi / rope_inv_freq(cfg).double().numpy()
    mid = (f > 1 + 1e-6) & (f < factor - 1e-6)
    low, high = 1.0, 4.0   # Meta's Llama 3.1 values, when the factors leave them undetermined
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(orig / wavelen[mid], s, 1)
        low, high = round(-icpt / slope, 5), round((1 - icpt) / slope, 5)
    rs = {"rope_type": "llama3", "factor": round(factor, 5), "low_freq_factor": low, "high_freq_factor": high,
          "original_max_position_embeddings": orig}
    scaled = cfg.replace(rope_scaling=rs)
    if not np.allclose(_rope_freqs(scaled), factors, rtol=1e-4):
        raise CheckpointError(f"{path}: rope_freqs is not a llama3 RoPE scaling lmfoundry can reproduce")
    return scaled


def read_gguf(path) -> tuple[ModelConfig, Format, dict]:
    """Config, format and canonical name -> loader (dequantized on demand, fp32 for quantized
    tensors), after checking every tensor the config implies is present with its shape."""
    gguf = require_gguf()
    meta, infos = gguf_metadata(path)
    shapes = {n: t.shape for n, t in infos.items()}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    cfg, arch = _config(meta, shapes, path)
    table, fmt_name, permute = ARCHS[arch]
    if "rope_freqs.weight" in infos:
        factors = _read(path, infos["rope_freqs.weight"], gguf).numpy()
        cfg = _llama3_scaling(cfg, factors, int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)), path)
    plan = weight_plan(cfg, table)
    ours = cfg.shapes()
    unexpected = [n for n in infos if n not in plan and n not in EXTRA_TENSORS]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} for GGUF architecture {arch}")
    loaders = {}
    for name, parts in plan.items():
        if name not in infos:
            raise CheckpointError(f"{path}: missing tensor {name}")
        want = (sum(ours[p][0] for p in parts), *ours[parts[0]][1:])
        if shapes[name] != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(shapes[name])}, the metadata implies "
                                  f"{list(want)}")
        _check_type(path, infos[name], gguf)
        heads = None
        if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = (cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)[int(name.split(".")[1])]
        for k, part in enumerate(parts):
            loaders[part] = lambda info=infos[name], k=k, heads=heads, sizes=[ours[p][0] for p in parts]: \
                _load(path, info, gguf, heads, sizes, k)
    return cfg, FORMATS[fmt_name], {n: loaders[n] for n in ours}


_DEQUANTIZABLE: dict = {}


def _check_type(path, info, gguf):
    qtype = info.tensor_type
    if qtype not in _DEQUANTIZABLE:
        block, size = gguf.GGML_QUANT_SIZES.get(qtype, (1, 1))
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
            _DEQUANTIZABLE[qtype] = True
        except (NotImplementedError, ValueError):
            _DEQUANTIZABLE[qtype] = False
    if not _DEQUANTIZABLE[qtype]:
        raise CheckpointError(f"{path}: tensor {info.name} is {qtype.name}, which the gguf library cannot dequantize")


def _read(path, info, gguf) -> torch.Tensor:
    """One tensor with plain file reads (a memory map would keep every page read resident)."""
    Q = gguf.GGMLQuantizationType
    shape = info.shape
    buf = np.empty(info.n_bytes, np.uint8)
    with open(path, "rb") as f:
        f.seek(info.data_offset)
        if f.readinto(buf) != info.n_bytes:
            raise CheckpointError(f"{path}: truncated while reading {info.name}")
    if info.tensor_type == Q.F32:
        return torch.from_numpy(buf.view(np.float32).reshape(shape))
    if info.tensor_type == Q.F16:
        return torch.from_numpy(buf.view(np.float16).reshape(shape))
    if info.tensor_type == Q.BF16:
        return torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16).reshape(shape)
    byte_shape = gguf.quant_shape_to_byte_shape(shape, info.tensor_type)
    return torch.from_numpy(gguf.quants.dequantize(buf.reshape(byte_shape), info.tensor_type))


def _load(path, info, gguf, heads, sizes, k) -> torch.Tensor:
    t = _read(path, info, gguf)
    if heads is not None:
        t = permute_qk(t, heads, inverse=True)
    if len(sizes) > 1:
        t = t.split(sizes)[k].clone()
    if t.is_floating_point() and not bool(torch.sum(t, dtype=torch.float32).isfinite()):
        raise CheckpointError(f"{path}: tensor {info.name} contains NaN or inf values")
    return t


def read_gguf_config(path) -> tuple[ModelConfig, Format]:
    cfg, fmt, _ = read_gguf(path)
    return cfg, fmt


# ----- tokenizer in --------------------------------------------------------------------

def tokenizer_files(path) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json (with the chat template) rebuilt from GGUF metadata."""
    meta = gguf_metadata(path)[0]
    backend, config = _build_tokenizer(meta, path)
    return {"tokenizer.json": backend.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}


def gguf_tokenizer(path):
    """lmfoundry's Tokenizer for a .gguf file (load_tokenizer dispatches here)."""
    from ..tokenizer import Tokenizer
    meta = gguf_metadata(path)[0]
    backend, config = _build_tokenizer(meta, path)
    special = {k: config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return Tokenizer(backend, special, config.get("chat_template"), f"{path}: tokenizer.chat_template")


def _build_tokenizer(meta: dict, path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    kind = meta.get("tokenizer.ggml.model")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not tokens:
        raise TokenizerError(f"{path}: no tokenizer.ggml.tokens (the file carries no vocabulary)")
    types = types or [NORMAL] * len(tokens)
    end = len(tokens)
    while end and types[end - 1] == UNUSED and tokens[end - 1].startswith("[PAD"):   # llama.cpp's filler rows
        end -= 1
    tokens, types = tokens[:end], types[:end]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: "
                                 f"{', '.join(PRE_TOKENIZERS)}")
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=PRE_TOKENIZERS[pre] == LLAMA3_SPLIT))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if PRE_TOKENIZERS[pre] == GPT2_SPLIT \
            else pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":   # SentencePiece BPE: merges implied by the scores, bytes as <0xNN> tokens
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
        tok = Tokenizer(models.BPE(vocab, merges or _spm_merges(tokens, types, scores), unk_token=unk,
                                   byte_fallback=True, fuse_unk=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                              + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise TokenizerError(f"{path}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), "
                             "llama (SentencePiece)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos"),
              "eos_token": name("eot") or name("eos"), "unk_token": name("unknown"), "pad_token": name("padding"),
              "chat_template": meta.get("tokenizer.chat_template"), "clean_up_tokenization_spaces": False}
    config = {k: v for k, v in config.items() if v is not None}
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and config.get("bos_token")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and name("eos")
    if add_bos or add_eos:
        single = " ".join(([f"{config['bos_token']}:0"] if add_bos else []) + ["$A:0"]
                          + ([f"{name('eos')}:0"] if add_eos else []))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        special = [(t, vocab[t]) for t in dict.fromkeys([config.get("bos_token") if add_bos else None,
                                                         name("eos") if add_eos else None]) if t]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok, config


def _spm_merges(tokens, types, scores) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule (merge the adjacent pair whose joined piece
    scores highest): every split of a normal token into two known pieces, best joined score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, ty, score in zip(tokens, types, scores):
        if ty != NORMAL or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def import_gguf(src, dst, to: str | None = None, dtype=None, max_shard_size="5GB", overwrite: bool = False) -> Path:
    """A GGUF file as a normal checkpoint directory in format `to` (default: the file's own)."""
    from . import write_checkpoint
    cfg, fmt, loaders = read_gguf(src)
    fmt = FORMATS.get(to or fmt.name)
    if fmt is None:
        raise ConfigError(f"unknown format {to!r}; known: {', '.join(FORMATS)}")
    why = refusal(cfg, fmt)
    if why:
        raise ConfigError(f"cannot convert {src} to {fmt.name}: {why}")
    return write_checkpoint(dst, cfg, loaders, fmt, dtype, max_shard_size, overwrite=overwrite,
                            extra_files=tokenizer_files(src))
