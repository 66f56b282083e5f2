"""A small Keras 3 language model for memopt's Keras tests and benchmark: token embedding, pre-norm Transformer
blocks (causal multi-head attention, a GELU feed-forward of 4 x d), a final norm and a Dense head to logits."""

from __future__ import annotations

from typing import Any


def make_lm(vocab: int = 1000, d: int = 128, heads: int = 4, blocks: int = 2, seq: int = 64,
            compiled: bool = True, jit: bool = False, dropout: float = 0.0) -> Any:
    """The model; ``compiled``: with AdamW and sparse cross-entropy on logits (``jit``: XLA-compiled steps);
    ``dropout``: the attention's dropout rate."""
    import keras
    from keras import layers

    class Block(layers.Layer):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.norm1 = layers.LayerNormalization(epsilon=1e-5)
            self.attention = layers.MultiHeadAttention(heads, d // heads, dropout=dropout)
            self.norm2 = layers.LayerNormalization(epsilon=1e-5)
            self.up = layers.Dense(4 * d, activation="gelu")
            self.down = layers.Dense(d)

        def call(self, x: Any) -> Any:
            h = self.norm1(x)
            x = x + self.attention(h, h, use_causal_mask=True)
            return x + self.down(self.up(self.norm2(x)))

    tokens = keras.Input((seq,), dtype="int32")
    x = layers.Embedding(vocab, d)(tokens)
    for _ in range(blocks):
        x = Block()(x)
    logits = layers.Dense(vocab)(layers.LayerNormalization(epsilon=1e-5)(x))
    model = keras.Model(tokens, logits)
    if compiled:
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def parameters(vocab: int = 1000, d: int = 128, blocks: int = 2) -> int:
    """The model's parameter count by hand: embedding, per block 2 norms (gamma, beta), q/k/v/o with biases and the
    feed-forward, the final norm and the head with its bias."""
    attention = 4 * (d * d + d)
    feed_forward = (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + blocks * (2 * 2 * d + attention + feed_forward) + 2 * d + (d * vocab + vocab)


def make_subclassed(vocab: int = 300, d: int = 48) -> Any:
    """A subclassed keras.Model, uncompiled: its weights exist only after its first call."""
    import keras
    from keras import layers

    class TinyLM(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = layers.Embedding(vocab, d)
            self.hidden = layers.Dense(3 * d, activation="relu")
            self.head = layers.Dense(vocab)

        def call(self, x: Any) -> Any:
            return self.head(self.hidden(self.embedding(x)))

    return TinyLM()
