"""The Transformer: one decoder-only model whose behaviour is decided by a ModelConfig.

Pre-norm residual blocks of RMSNorm -> attention (RoPE in the Hugging Face rotate-half
layout, MHA/GQA/MQA through scaled_dot_product_attention, optional q/k RMSNorm, optional
sliding window) and RMSNorm -> SwiGLU. Solar Pro's weighted skip connections blend a saved
residual stream back in before chosen layers. A static KV cache serves decoding, with one
length for the whole batch (generate) or one per row (continuous batching in serve/).

Parameter names are the canonical layout (ModelConfig.shapes()); checkpoint formats map
them to each architecture's Hugging Face names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import GenerationError

_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)   # enable_gqa arrived in 2.5


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
    """Preallocated keys and values for every layer, [B, n_kv_heads, max_len, head_dim].

    Shared-length mode (static batches): all rows hold `length` tokens. `pad` (LongTensor [B])
    counts left-padding slots per row: those keys are never attended to and RoPE positions
    start after them, so a left-padded batch decodes exactly like each row alone.

    Per-row mode (`per_row=True`, continuous batching): `lengths` (LongTensor [B]) holds each
    row's own token count. A forward with tokens [B, T] writes row b's keys at positions
    lengths[b] .. lengths[b]+T-1 (also its RoPE positions), lets row b see only its keys
    [0, lengths[b]+t], and advances every row by T. `row(b, length)` is a shared-length view of
    one row, for prefilling a sequence into it while the other rows wait; `rows(lo, hi)` is a
    per-row view of a range of rows. Views share storage with the cache they came from.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=None, device=None, pad=None,
                 per_row: bool = False):
        self.max_len = max_len
        self.k = [torch.zeros(batch, kv, max_len, cfg.head_dim, dtype=dtype, device=device) for kv in cfg.n_kv_heads]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.length = 0
        self.pad = None if pad is None or not bool((pad > 0).any()) else pad.to(device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device) if per_row else None
        self._end = 0   # per-row mode: keys [0, _end) are read by the current forward

    @classmethod
    def _view(cls, k, v, max_len, length=0, lengths=None) -> "KVCache":
        view = cls.__new__(cls)
        view.k, view.v, view.max_len, view.length, view.pad = k, v, max_len, length, None
        view.lengths, view._end = lengths, 0
        return view

    def row(self, b: int, length: int = 0) -> "KVCache":
        """Row b as a one-row, shared-length cache already holding `length` tokens."""
        return KVCache._view([k[b:b + 1] for k in self.k], [v[b:b + 1] for v in self.v], self.max_len, length)

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Rows [lo, hi) in per-row mode (their lengths advance in this cache too)."""
        return KVCache._view([k[lo:hi] for k in self.k], [v[lo:hi] for v in self.v], self.max_len,
                             lengths=self.lengths[lo:hi])

    def update(self, layer: int, k, v, start):
        if self.lengths is not None:   # start: positions [B, T], one write per row
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, start] = k.transpose(1, 2)
            self.v[layer][rows, :, start] = v.transpose(1, 2)
            return self.k[layer][:, :, :self._end], self.v[layer][:, :, :self._end]
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        groups = self.n_heads // self.n_kv_heads
        if T == 1 and groups > 1 and (mask is None or mask.shape[0] == B):
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

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, start)
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

    def new_cache(self, batch: int, max_len: int, pad=None, per_row: bool = False) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device, pad, per_row)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                doc_ids: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).

        With a cache, the tokens continue the cached sequence and their keys/values are
        appended to it. `doc_ids` [B, T] marks packed documents (training): a token attends
        only to earlier tokens of its own document, and RoPE positions restart at 0 at every
        document start, so a packed row computes exactly what each document computes alone.
        """
        B, T = tokens.shape
        per_row = cache is not None and cache.lengths is not None
        if per_row:
            if doc_ids is not None:
                raise GenerationError("doc_ids (packed documents) cannot be combined with a per-row KV cache")
            positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)   # [B, T]
            end = int(cache.lengths.max()) + T
            if end > cache.max_len:
                raise GenerationError(f"KV cache holds {cache.max_len} tokens per row; cannot append {T} "
                                      f"after {end - T}")
            cache._end, start = end, positions   # the cache writes row b at positions[b]
        else:
            start = cache.length if cache is not None else 0
            if cache is not None and start + T > cache.max_len:
                raise GenerationError(f"KV cache holds {cache.max_len} tokens; cannot append {T} after {start}")
            pad = cache.pad if cache is not None else None
            slots = torch.arange(start, start + T, device=tokens.device)
            if doc_ids is not None:
                positions = slots[None] - _doc_starts(doc_ids)
            else:
                positions = slots[None] if pad is None else (slots[None] - pad[:, None]).clamp(min=0)
        freqs = positions[..., None].float() * self.inv_freq          # [B or 1, T, hd/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]               # [B or 1, 1, T, hd]
        x = self.embed(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = self._row_mask(positions, end) if per_row else self._mask(start, T, pad, tokens.device)
        if doc_ids is not None:
            same_doc = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
            mask = same_doc & (mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril())

        saved = [None] * len(self.config.skip_save)
        w = self.config.skip_weights[0 if self.training else 1]
        for i, layer in enumerate(self.layers):
            for s in self._saves[i]:
                saved[s] = x
            for s in self._blends[i]:
                x = saved[s] * w + x * (1 - w)   # Solar Pro: weight on the earlier, saved state
            x = layer(x, cos, sin, mask, cache, i, start)
        if per_row:
            cache.lengths += T
        elif cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _row_mask(self, positions: torch.Tensor, end: int):
        """Per-row mode: [B, 1, T, end], query at positions[b, t] sees keys [0, positions[b, t]]
        of its own row (within the sliding window, if any)."""
        q = positions[:, None, :, None]
        k = torch.arange(end, device=positions.device)
        allowed = k <= q
        if self.config.sliding_window is not None:
            allowed = allowed & (q - k < self.config.sliding_window)
        return allowed

    def _mask(self, start: int, T: int, pad, device):
        """Boolean attention mask [B or 1, 1, T, start+T], or None when plain causal will do."""
        S, window = start + T, self.config.sliding_window
        windowed = window is not None and S > window
        if pad is None and not windowed and (T == 1 or start == 0):
            return None
        q = torch.arange(start, S, device=device)[:, None]
        k = torch.arange(S, device=device)[None]
        allowed = k <= q
        if windowed:
            allowed = allowed & (q - k < window)
        allowed = allowed[None, None]
        if pad is not None:
            # padding keys are never seen; a padding query sees itself so no row is empty
            allowed = (allowed & (k >= pad[:, None, None, None])) | (k == q)
        return allowed


def _doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """For each token, the index of the first token of its document (documents are contiguous)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
