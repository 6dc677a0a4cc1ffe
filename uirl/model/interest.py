"""The interest model: history texts -> event vectors -> user vector; score = cosine / temperature.

One forward pass encodes every text of every user in the batch as one (N, T) tensor, user-major.
Every quantity in a user's loss is computed from that user's own rows (own history, own
candidates; no in-batch negatives, no batch statistics), which is what makes per-user gradients
exact and user-level DP true.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uirl.model.encoder import Encoder
from uirl.model.pooling import AttentionPooling, pool_tokens


@dataclass
class UserBatch:
    """B users' texts, flattened.

    Shapes: ``input_ids``/``attention_mask`` (N, T); ``row_user`` (N,) which user owns each row;
    ``history_index``/``history_mask`` (B, H) rows of each user's history (padding repeats one of the
    user's own rows and is masked); ``candidate_index`` (B, C) rows of each user's candidates with
    the positive at column 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_user: torch.Tensor
    history_index: torch.Tensor
    history_mask: torch.Tensor
    candidate_index: torch.Tensor

    @property
    def num_users(self) -> int:
        return int(self.history_index.shape[0])

    def to(self, device: torch.device | str) -> "UserBatch":
        return UserBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.row_user,
                                                  self.history_index, self.history_mask, self.candidate_index)))


class InterestModel(nn.Module):
    def __init__(self, encoder: Encoder, *, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder.model
        self.pooling = encoder.pooling
        self.temperature = temperature
        dim = encoder.hidden_size
        self.history_pool = AttentionPooling(dim)
        # Residual user projection, zero-initialised: lets the user side learn which topics
        # co-occur (a preference, not a text similarity) without changing the zero-shot start.
        self.user_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.user_proj.weight)
        nn.init.zeros_(self.user_proj.bias)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) tokens -> (N, d) unit-norm text vectors."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(pool_tokens(out.last_hidden_state, attention_mask, self.pooling), dim=-1)

    def user_vectors(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, d) history event vectors + (B, H) mask -> (B, d) unit-norm user vectors."""
        pooled = self.history_pool(history, mask)
        return F.normalize(pooled + self.user_proj(pooled), dim=-1)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, d) users x (B, C, d) items -> (B, C) logits."""
        return torch.einsum("bd,bcd->bc", users, F.normalize(items, dim=-1)) / self.temperature

    def forward(self, input_ids, attention_mask, history_index, history_mask, candidate_index) -> torch.Tensor:
        """Per-user loss (B,): softmax cross-entropy of the positive among the user's own candidates."""
        events = self.encode_texts(input_ids, attention_mask)
        users = self.user_vectors(events[history_index], history_mask)
        logits = self.score(users, events[candidate_index])
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target, reduction="none")

    def batch_loss(self, batch: UserBatch) -> torch.Tensor:
        return self(batch.input_ids, batch.attention_mask, batch.history_index,
                    batch.history_mask, batch.candidate_index)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The arrays that travel: trainable adapter and head parameters, nothing frozen."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """All LoRA (A and B) + head parameters: the global model a server holds and checkpoints."""
        return {n: p.detach() for n, p in self.named_parameters()
                if p.requires_grad or "lora_" in n}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load (a subset of) :meth:`adapter_state`; unknown names or shapes are an error."""
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if name not in own or "lora_" not in name and not own[name].requires_grad:
                    raise KeyError(f"not an adapter/head parameter of this model: {name}")
                if tuple(own[name].shape) != tuple(value.shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != model's {tuple(own[name].shape)}")
                own[name].copy_(torch.as_tensor(value, dtype=own[name].dtype))
