"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) in plain PyTorch.

A strong, standard sequential recommender: the peer baseline row that shows what privacy and
federation cost. It is centralized and non-private, and knows item ids only (no text).

- A user's positives in time order are right-aligned in a window of ``max_len`` (left-padded with
  0); item k of the catalogue is id k + 1. Input = item embedding * sqrt(hidden) + a learned
  embedding of the window position, then ``blocks`` pre-LN causal self-attention blocks.
- The output at position t scores item i as ``h_t . E[i]`` with the same item embedding E.
- Training, as in the paper: one window per user (the last ``max_len`` + 1 training items), at
  every position t the next item is the positive and one item sampled uniformly from those the
  user never had in the sequence the negative, binary cross-entropy, Adam.
- The number of epochs is chosen on validation (see :func:`fit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from uirl.errors import ConfigError


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    epochs: int = 200  # at most; training stops after `patience` epochs without a better validation score
    patience: int = 20
    batch_size: int = 128  # users per step
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "blocks", "heads", "max_len", "epochs", "patience", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError("expected an integer >= 1", field=name, value=value)
        if self.hidden % self.heads:
            raise ConfigError(f"expected a divisor of hidden ({self.hidden})", field="heads", value=self.heads)
        if not 0 <= self.dropout < 1:
            raise ConfigError("expected a number in [0, 1)", field="dropout", value=self.dropout)
        if not self.lr > 0:
            raise ConfigError("expected a number > 0", field="lr", value=self.lr)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("expected an integer", field="seed", value=self.seed)


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ff = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                nn.Linear(cfg.hidden, cfg.hidden), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=blocked, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)  # id 0 = padding
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, right-aligned, 0 = padding, L <= max_len -> (B, L, hidden) outputs."""
        b, length = seq.shape
        keep = (seq != 0).unsqueeze(-1)
        x = self.item(seq) * math.sqrt(self.cfg.hidden) + self.pos(torch.arange(length, device=seq.device))
        x = self.drop(x) * keep
        # Position t attends to the real items at positions <= t; a padding position only to itself
        # (so that no row of the mask is all-blocked, which would give NaN).
        future = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu(1)
        pad_key = (seq == 0).unsqueeze(1) & ~torch.eye(length, dtype=torch.bool, device=seq.device)
        blocked = (future | pad_key).repeat_interleave(self.cfg.heads, dim=0)  # (B * heads, L, L)
        for block in self.blocks:
            x = block(x, blocked) * keep
        return self.ln_f(x)

    def scores(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``items`` (..., K) for output vectors ``h`` (..., hidden) -> (..., K)."""
        return (h.unsqueeze(-2) * self.item(items)).sum(-1)

    def catalogue_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(U, hidden) -> (U, num_items): the score of every catalogue item (id 1 .. N)."""
        return h @ self.item.weight[1:].T


def pad_left(sequences: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Each sequence's last ``length`` ids, right-aligned in a (len(sequences), length) int64 array."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = list(seq)[-length:]
        if tail:
            out[row, length - len(tail):] = tail
    return out


@torch.no_grad()
def last_outputs(model: SASRec, histories: Sequence[Sequence[int]], *, batch: int = 512) -> torch.Tensor:
    """(U, hidden): the output at each history's last item (what scores the item that follows)."""
    model.eval()
    device = next(model.parameters()).device
    seqs = torch.from_numpy(pad_left(histories, model.cfg.max_len))
    return torch.cat([model(seqs[i:i + batch].to(device))[:, -1] for i in range(0, len(seqs), batch)])


def _negatives(rng: np.random.Generator, rows: np.ndarray, owned: np.ndarray, shape: tuple[int, int],
               num_items: int) -> np.ndarray:
    """Uniform item ids in 1..num_items, redrawn (a few times) where the row's user owns the item.
    ``owned`` is the sorted array of ``user_row * (num_items + 1) + item`` codes."""
    neg = rng.integers(1, num_items + 1, size=shape)
    for _ in range(20):
        bad = np.isin(rows[:, None] * (num_items + 1) + neg, owned)
        if not bad.any():
            break
        neg[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))
    return neg


def fit(sequences: Sequence[Sequence[int]], num_items: int, cfg: SASRecConfig, *,
        validate: Callable[[SASRec], float] | None = None, device: str | torch.device = "cpu",
        ) -> tuple[SASRec, dict[str, float]]:
    """Train SASRec on users' training sequences (item ids 1..num_items, time order).

    With ``validate`` (model -> a score, higher is better, e.g. validation nDCG@10), it is called
    after every epoch, training stops after ``cfg.patience`` epochs without improvement and the
    model of the best epoch is returned; without it, all ``cfg.epochs`` are run. Deterministic for
    a given ``cfg.seed`` on a given device (the global torch RNG is left as it was). Returns the
    model and ``{"best-epoch", "epochs-run", "train-loss" (of the best epoch), "valid-score"}``.
    """
    users = [list(s) for s in sequences if len(s) >= 2]  # a sequence of 1 item has no next item
    if not users:
        raise ValueError("no training sequence has 2 or more items")
    windows = pad_left([s[-(cfg.max_len + 1):] for s in users], cfg.max_len + 1)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    owned = np.unique(np.concatenate([row * (num_items + 1) + np.asarray(s) for row, s in enumerate(users)]))
    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SASRec(num_items, cfg).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        best = {"best-epoch": 0.0, "epochs-run": 0.0, "train-loss": math.nan, "valid-score": -math.inf}
        best_state = None
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = rng.permutation(len(users))
            total, count = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start:start + cfg.batch_size]
                neg = _negatives(rng, rows, owned, (len(rows), cfg.max_len), num_items)
                seq, pos, neg = (torch.from_numpy(a).to(device) for a in (inputs[rows], targets[rows], neg))
                h = model(seq)
                real = seq != 0  # an item follows every real input position of the window
                pos_logit, neg_logit = model.scores(h, torch.stack([pos, neg], dim=-1)).unbind(-1)
                loss = (F.binary_cross_entropy_with_logits(pos_logit[real], torch.ones_like(pos_logit[real]))
                        + F.binary_cross_entropy_with_logits(neg_logit[real], torch.zeros_like(neg_logit[real])))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(rows), count + len(rows)
            best["epochs-run"] = float(epoch)
            score = validate(model) if validate is not None else float(epoch)
            if score > best["valid-score"] or best_state is None:
                best.update({"best-epoch": float(epoch), "train-loss": total / count, "valid-score": score})
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best["best-epoch"] >= cfg.patience:
                break
        model.load_state_dict(best_state)
    model.eval()
    return model, best
