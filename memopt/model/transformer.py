"""The Transformer builders: one LanguageModel with an encoder or a decoder stack.

``encoder``: token + learned position embeddings, a stack of ``nn.TransformerEncoderLayer``'s layer (built from
the same modules, see EncoderLayer), output projection.
``decoder``: causal LM with RMSNorm, RoPE, SwiGLU, grouped-query attention.
Both return the training loss from ``model(tokens, targets)`` through a replaceable ``loss_head``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from memopt.model.kv_cache import KVCache
from memopt.spec import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parameter_count(spec: ModelSpec) -> int:
    """Exact parameter count of ``build_model(spec)``, from the spec alone."""
    d, v, f, L = spec.d_model, spec.vocab_size, spec.ffn_dim, spec.n_layers
    assert f is not None and spec.n_kv_heads is not None
    head = (0 if spec.tie_embeddings else v * d) + (v if spec.head_bias else 0)
    if spec.arch == "encoder":
        attn = 4 * d * d + 4 * d                       # in_proj (3d x d + 3d) and out_proj (d x d + d)
        ffn = 2 * d * f + f + d                        # linear1, linear2 with biases
        layer = attn + ffn + 4 * d                     # two LayerNorms
        embed = v * d + spec.max_seq_len * d
        final = 2 * d if spec.final_norm else 0
    else:
        kv = spec.n_kv_heads * spec.head_dim
        layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o, k, v, SwiGLU, two RMSNorms
        embed = v * d
        final = d if spec.final_norm else 0
    return embed + L * layer + final + head


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; a packed quantized weight counts the parameters it stands for."""
    total = trainable = 0
    for p in model.parameters():
        total += getattr(p, "logical_numel", p.numel())
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (``module.to(dtype)`` fails under FakeTensorMode)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(spec: ModelSpec, dtype: str = "float32", device: str | torch.device = "cpu") -> LanguageModel:
    """Build the model with random weights directly on ``device`` in ``dtype``."""
    with torch.device(device), default_dtype(TORCH_DTYPES[dtype]):
        return LanguageModel(spec)


class EncoderLayer(nn.Module):
    """The layer of ``nn.TransformerEncoderLayer`` (post- or pre-norm, ReLU/GELU FFN), built from the same
    modules in the same order (same parameters, names and initial values), with attention eager (the s*s
    scores materialised: ``need_weights``) or SDPA, chosen per layer. Nothing of torch's is overridden."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, f = spec.d_model, spec.ffn_dim
        assert f is not None
        self.self_attn: nn.Module = nn.MultiheadAttention(d, spec.n_heads, dropout=spec.dropout, batch_first=True)
        self.linear1 = nn.Linear(d, f)
        self.dropout = nn.Dropout(spec.dropout)
        self.linear2 = nn.Linear(f, d)
        self.norm_first = spec.norm_first
        self.norm1 = nn.LayerNorm(d, eps=spec.norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=spec.norm_eps)
        self.dropout1 = nn.Dropout(spec.dropout)
        self.dropout2 = nn.Dropout(spec.dropout)
        self.activation = F.relu if spec.activation == "relu" else F.gelu
        self.attention = str(spec.attention)

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, value: str) -> None:
        self._attention = value
        if isinstance(self.self_attn, SelfAttention):
            self.self_attn.attention = value

    def split_attention(self) -> None:
        """Replace nn.MultiheadAttention by SelfAttention (plain Linears), same weights and math, so that
        compression strategies can quantize or prune its projections."""
        if isinstance(self.self_attn, nn.MultiheadAttention):
            self.self_attn = SelfAttention.from_multihead(self.self_attn, self.attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self._attend(self.norm1(x))
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x))
        return self.norm2(x + self._feed_forward(x))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.self_attn, SelfAttention):
            return self.dropout1(self.self_attn(x))
        # need_weights=True makes MultiheadAttention compute softmax(QK^T) explicitly: b*heads*s*s floats.
        out = self.self_attn(x, x, x, need_weights=self.attention == "eager", average_attn_weights=False)[0]
        return self.dropout1(out)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class Rope(nn.Module):
    """Rotary position embedding tables (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv)  # s, hd/2
        dtype = torch.get_default_dtype()
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # x: b, heads, s, hd at positions start..
        s = x.shape[-2]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = self.cos[start:start + s], self.sin[start:start + s]  # type: ignore[index]  # buffers
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no copy unless computing in another dtype (FSDP's bf16)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str, causal: bool,
           dropout: float, mask: torch.Tensor | None = None, training: bool = True) -> torch.Tensor:
    """Scaled dot-product attention over (b, heads, s, hd) tensors; k, v may have fewer (grouped) heads.

    ``eager`` materialises the b*heads*s*s probabilities; ``sdpa`` calls F.scaled_dot_product_attention.
    ``mask`` (s_q, s_k, True = may attend) replaces ``causal`` where queries and keys are not aligned (a cache).
    ``training`` false: no dropout call at all (as the model's eval mode, in inference).
    """
    grouped = k.shape[1] != q.shape[1]
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=causal and mask is None, enable_gqa=grouped)
    if grouped:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])                          # b, h, s, s
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        s = q.shape[-2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return F.dropout(scores.softmax(-1), dropout, training=training) @ v                  # b, h, s, hd


def cached_mask(s_q: int, q_start: int, s_k: int, k_start: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask of queries at positions q_start.. over keys at k_start..; None when every key is allowed
    (one query, as in decoding: its keys are all in its past)."""
    if s_q == 1:
        return None
    q_pos = torch.arange(q_start, q_start + s_q, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + s_k, device=device)[None, :]
    return k_pos <= q_pos


class SelfAttention(nn.Module):
    """Multi-head (optionally grouped-query, causal, rotary) self-attention with separate q, k, v, o."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool, causal: bool,
                 dropout: float, attention: str, rope: Rope | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.causal, self.dropout, self.attention = causal, dropout, attention
        self._rope = [rope]  # shared, not a submodule (kept out of this module's state)
        self.layer_index = 0  # its slot in a KV cache (set by LanguageModel)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, attention: str) -> SelfAttention:
        """The same weights as an ``nn.MultiheadAttention`` (self-attention, batch_first), split into Linears."""
        d, h = mha.embed_dim, mha.num_heads
        with torch.device(mha.in_proj_weight.device), default_dtype(mha.in_proj_weight.dtype):
            new = cls(d, h, h, d // h, bias=mha.in_proj_bias is not None, causal=False, dropout=mha.dropout,
                      attention=attention)
        with torch.no_grad():
            for lin, w, b in zip((new.q, new.k, new.v), mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            new.o.weight.copy_(mha.out_proj.weight)
            new.o.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (b, s, d) -> (b, s, d); with a cache, x holds the positions after those the cache has seen."""
        b, s, _ = x.shape
        start = cache.length if cache is not None else 0
        q = self.q(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)               # b, h, s, hd
        k = self.k(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)            # b, kv, s, hd
        v = self.v(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)            # b, kv, s, hd
        rope = self._rope[0]
        if rope is not None:
            q, k = rope(q, start), rope(k, start)
        mask, causal = None, self.causal
        if cache is not None:
            k, v, k_start = cache.update(self.layer_index, k, v)
            if k_start or start:  # queries after cached keys: causal from where each query is
                mask = cached_mask(s, start, k.shape[-2], k_start, x.device)
                causal = False    # one query (decoding) attends to every key, all in its past
        y = attend(q, k, v, kind=self.attention, causal=causal, dropout=self.dropout if self.training else 0.0,
                   mask=mask, training=self.training)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope: Rope):
        super().__init__()
        assert spec.ffn_dim is not None
        self.attn_norm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        assert spec.n_kv_heads is not None
        self.attn = SelfAttention(spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, bias=False, causal=True,
                                  dropout=spec.dropout, attention=str(spec.attention), rope=rope)
        self.ffn_norm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.ffn = SwiGLU(spec.d_model, spec.ffn_dim)
        self.drop = nn.Dropout(spec.dropout)

    @property
    def attention(self) -> str:
        return self.attn.attention

    @attention.setter
    def attention(self, value: str) -> None:
        self.attn.attention = value

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cache))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class CrossEntropyHead(nn.Module):
    """Output projection + mean cross-entropy over all tokens, logits materialised whole."""

    def forward(self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)                                       # b, s, vocab
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class LanguageModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d = spec.d_model
        self.tok = nn.Embedding(spec.vocab_size, d)
        if spec.arch == "encoder":
            self.pos: nn.Embedding | None = nn.Embedding(spec.max_seq_len, d)
            self.rope = None
            self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.n_layers))
            norm: nn.Module = nn.LayerNorm(d, eps=spec.norm_eps)
        else:
            self.pos = None
            self.rope = Rope(spec.head_dim, spec.max_seq_len)
            self.layers = nn.ModuleList(DecoderLayer(spec, self.rope) for _ in range(spec.n_layers))
            for i, layer in enumerate(self.layers):
                cast(DecoderLayer, layer).attn.layer_index = i
            norm = nn.RMSNorm(d, eps=spec.norm_eps)
        self.norm = norm if spec.final_norm else nn.Identity()
        self.head = nn.Linear(d, spec.vocab_size, bias=bool(spec.head_bias))
        if spec.tie_embeddings:
            self.head.weight = self.tok.weight
        self.loss_head: nn.Module = CrossEntropyHead()

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, s) -> final hidden states (b, s, d)."""
        x = self.tok(tokens)                                        # b, s, d
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """tokens, targets (b, s) -> scalar mean cross-entropy loss."""
        return self.loss_head(self.hidden(tokens), self.head, targets)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, s) -> logits (b, s, vocab), for accuracy drift."""
        return self.head(self.hidden(tokens))

    def next_logits(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (b, s) after the cache's positions (decoder only) -> the last position's logits (b, vocab);
        the cache then holds these positions too. Without a cache: the whole sequence, recomputed."""
        x = self.tok(tokens)
        for layer in self.layers:
            x = layer(x, cache) if cache is not None else layer(x)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.head(self.norm(x[:, -1]))
