"""The Transformer: one decoder-only model whose behaviour is decided by a ModelConfig.

Pre-norm residual blocks of RMSNorm -> attention (RoPE in the Hugging Face rotate-half
layout, MHA/GQA/MQA, optional q/k RMSNorm, optional sliding window) and RMSNorm -> SwiGLU.
Solar Pro's weighted skip connections blend a saved residual stream back in before chosen
layers. A static KV cache with one length per row serves every decoder (generate's static
batches, the serving engine's continuous batching).

Attention runs through scaled_dot_product_attention with a dense boolean mask where one is
needed (packed documents, sliding windows, rows of different lengths): the reference, and what
runs on CPU. With `attn_impl` "flex" (the default "auto" picks it on GPU) the same masks are
FlexAttention block masks instead, so memory does not grow with T^2; tests hold both equal.

Parameter names are the canonical layout (ModelConfig.shapes()); checkpoint formats map
them to each architecture's Hugging Face names.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import GenerationError

_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)   # enable_gqa arrived in 2.5
ATTN_IMPLS = ("auto", "dense", "flex")


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_compiled_flex = None


def _flex_attention(q, k, v, block_mask, enable_gqa):
    """FlexAttention; on GPU through torch.compile (its eager form is a reference that builds the
    whole score matrix), on CPU eager (the tests' path: same math as the fused kernel)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _block_mask(mask_mod, B, T, S, device):
    """A FlexAttention BlockMask of mask_mod over [B, T queries, S keys] (shared by all heads);
    on GPU built by a compiled pass that never holds the dense [T, S] mask."""
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, B, None, T, S, device=device, _compile=torch.device(device).type == "cuda")


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in fp32, cast back, then scaled (as HF Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with linear or llama3 scaling applied (fp32)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    # llama3 (Meta's apply_scaling / transformers' _compute_llama3_parameters): keep high
    # frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer, [B, n_kv_heads, max_len, head_dim], and
    each row's token count in `lengths` (a CPU LongTensor [B]: the host reads it without a sync).

    A forward with tokens [B, T] writes row b's keys at positions lengths[b] .. lengths[b]+T-1
    (also their RoPE positions), lets each query see its own row's keys up to its own position,
    and advances every row by T. Rows may hold different lengths, so one forward decodes rows
    of any length (continuous batching), and right-padded prompts of different lengths are
    prefilled together: the padding's keys land after a row's end, where the row's next real
    tokens overwrite them before anything can read them, and the caller then sets `lengths` to
    the real lengths. `rows(lo, hi)` is a view of a range of rows that shares storage and lengths.
    A `static` cache keeps every shape fixed (each forward reads all max_len keys, masked): what a
    compiled decode step needs (generate.compile_decoding).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=None, device=None, static: bool = False):
        self.max_len, self.static = max_len, static
        self.k = [torch.zeros(batch, kv, max_len, cfg.head_dim, dtype=dtype, device=device) for kv in cfg.n_kv_heads]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lengths = torch.zeros(batch, dtype=torch.long)

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Rows [lo, hi) as a cache of their own (their keys and lengths are this cache's)."""
        view = KVCache.__new__(KVCache)
        view.max_len, view.lengths, view.static = self.max_len, self.lengths[lo:hi], self.static
        view.k, view.v = [k[lo:hi] for k in self.k], [v[lo:hi] for v in self.v]
        return view

    def row(self, b: int) -> "KVCache":
        return self.rows(b, b + 1)

    def plan(self, T: int, device) -> "CacheWrite":
        """Where a forward of T tokens per row writes, and how many keys it reads."""
        lengths = self.lengths
        end = int(lengths.max()) + T
        if end > self.max_len:
            raise GenerationError(f"KV cache holds {self.max_len} tokens per row; cannot append {T} after "
                                  f"{end - T}")
        positions = lengths.to(device, non_blocking=True)[:, None] + torch.arange(T, device=device)
        if self.static:               # fixed shapes: read every key, write by position
            return CacheWrite(positions, self.max_len, None)
        start = int(lengths[0])
        uniform = bool((lengths == start).all())
        return CacheWrite(positions, end, start if uniform else None)

    def update(self, layer: int, k, v, write: "CacheWrite"):
        """Store this forward's keys and values [B, kv, T, hd]; return the keys and values to attend to."""
        if write.start is not None:   # every row starts at the same length: one slice
            self.k[layer][:, :, write.start:write.start + k.shape[2]] = k
            self.v[layer][:, :, write.start:write.start + k.shape[2]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, write.positions] = k.transpose(1, 2)
            self.v[layer][rows, :, write.positions] = v.transpose(1, 2)
        return self.k[layer][:, :, :write.end], self.v[layer][:, :, :write.end]


class CacheWrite(NamedTuple):
    positions: torch.Tensor       # [B, T] where each new token goes (and its RoPE position)
    end: int                      # keys [0, end) are read
    start: int | None             # the rows' common length, None when they differ


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        d, hd = cfg.dim, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads[i], cfg.n_kv_heads[i], hd
        self.q = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(self.n_heads * hd, d, bias=False)
        # OpenELM: RMSNorm over head_dim, one weight shared by all heads, before RoPE.
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, write: CacheWrite | None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, write)
        groups = self.n_heads // self.n_kv_heads
        if mask is not None and not isinstance(mask, torch.Tensor):   # a FlexAttention BlockMask
            y = _flex_attention(q, k, v, mask, groups > 1)
        elif T == 1 and groups > 1 and (mask is None or mask.shape[0] == B):
            # One query per row: fold the query heads of each kv group into the query axis,
            # so keys and values are read once per group instead of being repeated.
            q = q.reshape(B, self.n_kv_heads, groups, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.reshape(B, self.n_heads, 1, self.head_dim)
        else:
            if groups > 1 and not _SDPA_HAS_GQA:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            kw = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, **kw)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, i)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ffn_dim[i])

    def forward(self, x, cos, sin, mask, cache, layer, write):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, write)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.attn_impl = "auto"   # how masked attention runs: dense (SDPA + boolean mask), flex, auto
        # skip-connection plan: for each layer, the slots it saves into and blends from
        self._saves = [[s for s, idx in enumerate(cfg.skip_save) if i in idx] for i in range(cfg.n_layers)]
        self._blends = [[s for s, idx in enumerate(cfg.skip_blend) if i in idx] for i in range(cfg.n_layers)]
        if self.embed.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        """Normal(0, init_std) for every matrix, ones for every norm (as HF Llama)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=self.config.init_std)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [V, D]: lm_head's (with an adapter put on it from outside, the
        merged weight it multiplies by), or the embeddings' when they are tied."""
        if self.lm_head is None:
            return self.embed.weight
        merged = getattr(self.lm_head, "merged_weight", None)
        return merged() if merged is not None else self.lm_head.weight

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for `batch` rows of `max_len` tokens (static when decoding is compiled)."""
        static = getattr(self, "compiled_decode", None) is not None
        return KVCache(self.config, batch, max_len, self.dtype, self.device, static=static)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                doc_ids: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                hidden: bool = False, head=None):
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only, or at one position per
        row with logits_at, a LongTensor [B] of positions in 0..T-1).

        With a cache, the tokens continue each row's cached sequence and their keys/values are
        appended to it. `doc_ids` [B, T] marks packed documents (training): a token attends
        only to earlier tokens of its own document, and RoPE positions restart at 0 at every
        document start, so a packed row computes exactly what each document computes alone.

        hidden: return the final-normed hidden states [B, T, D] instead of logits (a reward head
        reads them). head: a function (hidden [B, T, D], output weight [V, D]) -> anything, run
        inside this forward instead of the output layer (the chunked loss: under FSDP2 the
        sharded output weight is gathered for exactly this call).
        """
        B, T = tokens.shape
        write = None
        flex = self._use_flex(tokens.device)
        if cache is not None:
            if doc_ids is not None:
                raise GenerationError("doc_ids (packed documents) cannot be combined with a KV cache")
            write = cache.plan(T, tokens.device)
            positions, mask = write.positions, self._cache_mask(write, T, flex)
        else:
            positions = torch.arange(T, device=tokens.device)[None]
            if doc_ids is not None:
                positions = positions - _doc_starts(doc_ids)
            mask = self._mask(T, doc_ids, tokens.device, flex)
        x = self._trunk(tokens, positions, mask, cache, write)
        if cache is not None:
            cache.lengths += T
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at.to(x.device)][:, None]
        elif last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if hidden:
            return x
        if head is not None:
            return head(x, self.output_weight)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _trunk(self, tokens, positions, mask, cache, write):
        """Embeddings, RoPE and every block (with Solar Pro's skips): the hidden states before the final norm."""
        freqs = positions[..., None].float() * self.inv_freq          # [B or 1, T, hd/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]               # [B or 1, 1, T, hd]
        x = self.embed(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        saved = [None] * len(self.config.skip_save)
        w = self.config.skip_weights[0 if self.training else 1]
        for i, layer in enumerate(self.layers):
            for s in self._saves[i]:
                saved[s] = x
            for s in self._blends[i]:
                x = saved[s] * w + x * (1 - w)   # Solar Pro: weight on the earlier, saved state
            x = layer(x, cos, sin, mask, cache, i, write)
        return x

    def decode(self, tokens: torch.Tensor, cache: KVCache, write: CacheWrite) -> torch.Tensor:
        """One token per row (tokens [B]) into a static cache at a write planned beforehand ->
        next-token logits [B, V]. Only tensor work with fixed shapes (every key of the cache is
        read, masked by position): what a compiled decoder (CUDA graphs) replays; the caller
        advances cache.lengths."""
        x = self._trunk(tokens[:, None], write.positions, self._cache_mask(write, 1), cache, write)
        x = self.norm(x[:, -1])
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _use_flex(self, device) -> bool:
        """FlexAttention where asked (auto: on GPU) and where it runs: its backward is GPU-only,
        so a CPU forward that records gradients takes the dense path."""
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        on_gpu = torch.device(device).type == "cuda"
        if self.attn_impl == "dense" or not flex_available() or (not on_gpu and torch.is_grad_enabled()):
            return False
        return on_gpu or self.attn_impl == "flex"

    def _cache_mask(self, write: CacheWrite, T: int, flex: bool = False):
        """[B, 1, T, end]: the query at positions[b, t] sees keys [0, positions[b, t]] of its row
        (within the sliding window, if any); None when plain causal attention computes that.
        With `flex`, the same mask as a FlexAttention BlockMask."""
        window = self.config.sliding_window
        windowed = window is not None and write.end > window
        if write.start is not None and not windowed and (T == 1 or write.start == 0):
            return None
        if flex:
            positions = write.positions

            def visible(b, h, q, k):
                seen = k <= positions[b, q]
                return seen & (positions[b, q] - k < window) if windowed else seen
            return _block_mask(visible, positions.shape[0], T, write.end, positions.device)
        q = write.positions[:, None, :, None]
        k = torch.arange(write.end, device=q.device)
        allowed = k <= q
        if windowed:
            allowed = allowed & (q - k < window)
        return allowed

    def _mask(self, T: int, doc_ids, device, flex: bool = False):
        """Without a cache: None for plain causal attention, else a boolean mask [B or 1, 1, T, T]
        (sliding window, packed documents), or with `flex` the same as a FlexAttention BlockMask."""
        window = self.config.sliding_window
        windowed = window is not None and T > window
        if doc_ids is None and not windowed:
            return None
        if flex:
            def visible(b, h, q, k):
                seen = k <= q
                if windowed:
                    seen = seen & (q - k < window)
                return seen & (doc_ids[b, q] == doc_ids[b, k]) if doc_ids is not None else seen
            return _block_mask(visible, None if doc_ids is None else doc_ids.shape[0], T, T, device)
        q = torch.arange(T, device=device)[:, None]
        k = torch.arange(T, device=device)[None]
        allowed = k <= q
        if windowed:
            allowed = allowed & (q - k < window)
        allowed = allowed[None, None]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        return allowed


def _doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """For each token, the index of the first token of its document (documents are contiguous)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
