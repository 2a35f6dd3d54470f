"""A small decoder-only transformer language model over characters.

The GPT layout of Radford et al. 2019 (pre-norm blocks, learned positions, causal
self-attention, a GELU MLP of four times the width, weights of the output layer tied to the
token embedding), at the size a CPU trains in minutes: with the defaults (``vocab_size`` 65,
``d_model`` 128, 4 layers, 4 heads, ``context`` 128) it has about 0.82 M parameters.

Batches are dicts: ``{"input_ids": int64[B, T], "labels": int64[B, T]}`` (``labels`` is
``input_ids`` shifted left by one); :meth:`CharTransformer.forward` returns the logits
``float32[B, T, vocab_size]`` and :func:`lm_loss` the mean cross-entropy in nats per character.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``<= t`` only."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, time, self.num_heads, width // self.num_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Decoder-only transformer over a character vocabulary.

    Args:
        vocab_size: number of distinct characters (65 for Tiny Shakespeare).
        d_model: width of the residual stream.
        num_layers: transformer blocks.
        num_heads: attention heads (``d_model`` must be divisible by it).
        context: longest sequence, in characters (the learned position table's size).
        dropout: dropout probability in attention and MLP (0 = none).

    Raises:
        ValueError: ``d_model`` not divisible by ``num_heads``, or a size below 1.
    """

    def __init__(
        self,
        vocab_size: int = 65,
        d_model: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        context: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(vocab_size, d_model, num_layers, num_heads, context) < 1:
            raise ValueError("CharTransformer: every size must be >= 1")
        if d_model % num_heads:
            raise ValueError(
                f"CharTransformer: d_model ({d_model}) must be divisible by num_heads "
                f"({num_heads}); change one of them"
            )
        self.context = context
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.token.weight  # tied (Press & Wolf 2017)
        self.apply(self._init)
        # GPT-2's scaled init of the projections into the residual stream
        for name, param in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * num_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``float[B, T, vocab_size]`` of the next character for ``input_ids``
        ``int64[B, T]``, ``T <= context``.

        Raises:
            ValueError: ``T`` exceeds ``context``.
        """
        time = input_ids.shape[1]
        if time > self.context:
            raise ValueError(
                f"CharTransformer: sequence of {time} characters exceeds context {self.context}"
            )
        positions = torch.arange(time, device=input_ids.device)
        x = self.token(input_ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's ``step_fn`` for a language model: ``(loss, logits)`` of a dict batch
    ``{"input_ids": int64[B, T], "labels": int64[B, T]}``."""
    logits = model(batch["input_ids"])
    return lm_loss(logits, batch["labels"]), logits


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats per character.

    Args:
        logits: ``float[B, T, V]``.
        labels: ``int64[B, T]``.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
