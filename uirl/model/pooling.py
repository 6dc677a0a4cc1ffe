"""Pooling token states into one vector per text, and event vectors into one vector per user."""

from __future__ import annotations

import torch
from torch import nn


def pool_tokens(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(N, T, d) token states + (N, T) 0/1 mask -> (N, d) text vectors.

    ``mean``: masked mean (sentence-transformers style, for encoders). ``last``: the state of the
    last unmasked token (for decoder LLMs, whose last token has attended to the whole text);
    assumes right padding.
    """
    if how == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ValueError(f"unknown pooling {how!r}")


class AttentionPooling(nn.Module):
    """Additive attention over a user's history: w = softmax(v . tanh(W h)), user = sum w h.

    ``v`` starts at zero, so an untrained head is the plain mean of the history (the zero-shot
    baseline) and training can only move away from it. Uses ``nn.Linear`` only, so Opacus computes
    its per-user gradients with its standard hooks (one row per user: the input is (B, H, d)).
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        # No bias: softmax ignores a shift shared by every position, so a bias would get a zero
        # gradient that Adam (which normalises the step) turns into a random walk of float noise.
        self.score = nn.Linear(hidden, 1, bias=False)
        nn.init.zeros_(self.score.weight)

    def forward(self, events: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, d) history vectors + (B, H) bool mask (at least one True per row) -> (B, d)."""
        logits = self.score(torch.tanh(self.proj(events))).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return (weights.unsqueeze(-1) * events).sum(1)
