"""Per-user examples -> one flat, user-major batch of token rows (see :class:`UserBatch`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from uirl.model.interest import UserBatch


class TextBank:
    """Item texts tokenised once (truncated to ``max_tokens``), padded per batch."""

    def __init__(self, item_text: Mapping[str, str], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> None:
        ids = list(item_text)
        encoded = tokenizer([item_text[i] for i in ids], truncation=True, max_length=max_tokens)["input_ids"]
        self._tokens = dict(zip(ids, encoded))
        self.pad_id = int(tokenizer.pad_token_id)

    @property
    def item_ids(self) -> list[str]:
        return list(self._tokens)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._tokens

    def tokens(self, item_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ids -> right-padded (N, T) input ids and 0/1 attention mask."""
        rows = [self._tokens[i] for i in item_ids]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            input_ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, : len(r)] = 1
        return input_ids, mask

    def make_batch(self, examples: Sequence[tuple[Sequence[str], Sequence[str]]]) -> UserBatch:
        """``examples[b] = (history item ids, candidate item ids with the positive first)``.

        Each user's rows are contiguous: its history, then its candidates. Every user needs at
        least one history item; all users need the same number of candidates.
        """
        if not examples:
            raise ValueError("make_batch needs at least one user")
        num_cands = len(examples[0][1])
        max_hist = max(len(h) for h, _ in examples)
        order: list[str] = []
        row_user, hist_index, hist_mask, cand_index = [], [], [], []
        for b, (history, candidates) in enumerate(examples):
            if not history or len(candidates) != num_cands:
                raise ValueError(f"user {b}: needs >= 1 history item and {num_cands} candidates")
            start = len(order)
            order.extend(history)
            order.extend(candidates)
            row_user.extend([b] * (len(history) + len(candidates)))
            own = list(range(start, start + len(history)))
            # Pad with the user's own first row (masked): a user's tensor never points at another user.
            hist_index.append(own + [start] * (max_hist - len(own)))
            hist_mask.append([True] * len(own) + [False] * (max_hist - len(own)))
            cstart = start + len(history)
            cand_index.append(list(range(cstart, cstart + num_cands)))
        input_ids, mask = self.tokens(order)
        return UserBatch(input_ids=input_ids, attention_mask=mask,
                         row_user=torch.tensor(row_user, dtype=torch.long),
                         history_index=torch.tensor(hist_index, dtype=torch.long),
                         history_mask=torch.tensor(hist_mask, dtype=torch.bool),
                         candidate_index=torch.tensor(cand_index, dtype=torch.long))
