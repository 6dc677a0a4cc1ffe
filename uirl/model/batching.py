"""Per-user examples -> one flat, user-major batch of token rows (see :class:`UserBatch`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from uirl.config import InterestConfig
from uirl.data.split import UserData
from uirl.data.views import label_index
from uirl.model.interest import UserBatch
from uirl.model.parts import category_bucket

#: Prefix of the row key of a user-written text (item ids name item rows).
TEXT_KEY = "\x00text:"


@dataclass(frozen=True)
class Example:
    """One user's example. ``candidates[0]`` is the positive. Optional side data:
    ``behaviors`` a label index per history item (-1 unknown; :data:`uirl.data.views.BEHAVIOR_LABELS`),
    ``texts`` the user's own texts written before the target, ``social`` neighbours' items,
    ``seed`` the user's noise seed (VAE sampling)."""

    history: tuple[str, ...]
    candidates: tuple[str, ...]
    behaviors: tuple[int, ...] = ()
    texts: tuple[str, ...] = ()
    social: tuple[str, ...] = ()
    seed: int = 0


class TextBank:
    """Item texts tokenised once (truncated to ``max_tokens``), padded per batch. Optional item
    ``category`` (topic) and ``image`` features feed the facet heads and the image view; users'
    own texts are tokenised on first use and cached."""

    def __init__(self, item_text: Mapping[str, str], tokenizer: PreTrainedTokenizerBase, max_tokens: int, *,
                 category: Mapping[str, str] | None = None,
                 image: Mapping[str, Sequence[float]] | None = None) -> None:
        ids = list(item_text)
        encoded = tokenizer([item_text[i] for i in ids], truncation=True, max_length=max_tokens)["input_ids"]
        self._tokens = dict(zip(ids, encoded))
        self._item_ids = ids
        self._tokenizer, self._max_tokens = tokenizer, max_tokens
        self.pad_id = int(tokenizer.pad_token_id)
        self.category = {i: category_bucket(c) for i, c in (category or {}).items()}
        self.image = {i: torch.tensor(v, dtype=torch.float32) for i, v in (image or {}).items()}
        self.image_dim = len(next(iter(self.image.values()))) if self.image else 0
        #: item id -> popularity prior (log of the released count); empty: no prior in batches
        self.prior: dict[str, float] = {}
        #: row key -> encoder vector, kept only while the encoder is frozen (cached training mode);
        #: None means every call encodes afresh (LoRA training changes the encoder every round)
        self.vectors: dict[str, torch.Tensor] | None = None

    def set_prior(self, item_ids: Sequence[str], values: Sequence[float]) -> None:
        """Attach the popularity prior: ``values[k]`` belongs to ``item_ids[k]``."""
        if len(item_ids) != len(values):
            raise ValueError(f"prior has {len(values)} values for {len(item_ids)} items")
        self.prior = {i: float(v) for i, v in zip(item_ids, values)}

    def prior_of(self, item_ids: Sequence[str]) -> torch.Tensor | None:
        """(len,) prior values of ``item_ids`` (0 for an item without one), or None without a prior."""
        if not self.prior:
            return None
        return torch.tensor([self.prior.get(i, 0.0) for i in item_ids], dtype=torch.float32)

    def prior_row(self, item_ids: Sequence[str], device: torch.device | str) -> torch.Tensor | None:
        """(1, len) prior of ``item_ids`` on ``device``, as ``score_rep`` takes it for one user, or None."""
        values = self.prior_of(item_ids)
        return None if values is None else values[None].to(device)

    @property
    def item_ids(self) -> list[str]:
        return list(self._item_ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._tokens

    def _row(self, key: str) -> list[int]:
        if key not in self._tokens and key.startswith(TEXT_KEY):
            self._tokens[key] = self._tokenizer(key[len(TEXT_KEY):], truncation=True,
                                                max_length=self._max_tokens)["input_ids"]
        return self._tokens[key]

    def token_ids(self, key: str) -> list[int]:
        """One row's token ids after truncation."""
        return list(self._row(key))

    def token_count(self, key: str) -> int:
        """Tokens of one row's text after truncation (for length bucketing)."""
        return len(self._row(key))

    def tokens(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ids (or ``TEXT_KEY + text``) -> right-padded (N, T) input ids and 0/1 attention mask."""
        rows = [self._row(k) for k in keys]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            input_ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, : len(r)] = 1
        return input_ids, mask

    def make_batch(self, examples: Sequence[Example | tuple[Sequence[str], Sequence[str]]], *,
                   tokens: bool = True, owners: Sequence[int] | None = None) -> UserBatch:
        """``examples[b]``: an :class:`Example` or ``(history item ids, candidate ids, positive first)``.
        ``owners[b]``: the user of example b, when users have several examples (0, 0, 1, 1, ...:
        every user from 0 up, each user's examples together); None: one example per user.

        Each user's rows are contiguous: history, candidates, own texts, neighbours' items. Every
        user needs at least one history item; all users need the same number of candidates.
        Optional tensors are present when any example (or the bank) has that side data.
        ``tokens=False`` skips tokenising (the caller has the row vectors: ``row_keys``).
        """
        if not examples:
            raise ValueError("make_batch needs at least one user")
        if owners is not None:
            owners = list(owners)
            steps = [b - a for a, b in zip(owners, owners[1:])]
            if len(owners) != len(examples) or owners[0] != 0 or any(s not in (0, 1) for s in steps):
                raise ValueError("owners must number the examples' users 0, 1, ... in order, one per example")
        examples = [e if isinstance(e, Example) else Example(tuple(e[0]), tuple(e[1])) for e in examples]
        num_cands = len(examples[0].candidates)
        max_hist = max(len(e.history) for e in examples)
        order: list[str] = []
        row_user, hist_index, hist_mask, cand_index = [], [], [], []
        side = {"text": ([], []), "social": ([], [])}
        width = {"text": max(len(e.texts) for e in examples), "social": max(len(e.social) for e in examples)}
        for b, ex in enumerate(examples):
            if not ex.history or len(ex.candidates) != num_cands:
                raise ValueError(f"user {b}: needs >= 1 history item and {num_cands} candidates")
            start = len(order)
            keys = (list(ex.history) + list(ex.candidates) + [TEXT_KEY + t for t in ex.texts] + list(ex.social))
            order.extend(keys)
            row_user.extend([b] * len(keys))
            own = list(range(start, start + len(ex.history)))
            # Pad with the user's own first row (masked): a user's tensor never points at another user.
            hist_index.append(own + [start] * (max_hist - len(own)))
            hist_mask.append([True] * len(own) + [False] * (max_hist - len(own)))
            cstart = start + len(ex.history)
            cand_index.append(list(range(cstart, cstart + num_cands)))
            offset = cstart + num_cands
            for name, values in (("text", ex.texts), ("social", ex.social)):
                rows = list(range(offset, offset + len(values)))
                side[name][0].append(rows + [start] * (width[name] - len(rows)))
                side[name][1].append([True] * len(rows) + [False] * (width[name] - len(rows)))
                offset += len(values)
        extra = {}
        for name in ("text", "social"):
            if width[name]:
                extra[f"{name}_index"] = torch.tensor(side[name][0], dtype=torch.long)
                extra[f"{name}_mask"] = torch.tensor(side[name][1], dtype=torch.bool)
        if any(e.behaviors for e in examples):
            extra["history_label"] = torch.tensor(
                [list(e.behaviors[:len(e.history)]) + [-1] * (max_hist - min(len(e.behaviors), len(e.history)))
                 for e in examples], dtype=torch.long)
        if self.category:
            extra["history_category"] = torch.tensor(
                [[self.category.get(i, -1) for i in e.history] + [-1] * (max_hist - len(e.history))
                 for e in examples], dtype=torch.long)
        if self.image:
            blank = torch.zeros(self.image_dim)
            extra["history_image"] = torch.stack([torch.stack(
                [self.image.get(i, blank) for i in e.history] + [blank] * (max_hist - len(e.history)))
                for e in examples])
            extra["image_mask"] = torch.tensor([[i in self.image for i in e.history] + [False] * (max_hist - len(e.history))
                                                for e in examples], dtype=torch.bool)
        extra["noise_seed"] = torch.tensor([e.seed for e in examples], dtype=torch.long)
        if self.prior:
            extra["candidate_prior"] = torch.stack([self.prior_of(e.candidates) for e in examples])
        input_ids, mask = self.tokens(order) if tokens else (torch.zeros(0, 0, dtype=torch.long),) * 2
        return UserBatch(input_ids=input_ids, attention_mask=mask,
                         row_user=torch.tensor(row_user, dtype=torch.long),
                         history_index=torch.tensor(hist_index, dtype=torch.long),
                         history_mask=torch.tensor(hist_mask, dtype=torch.bool),
                         candidate_index=torch.tensor(cand_index, dtype=torch.long), row_keys=order,
                         example_user=None if owners is None else torch.tensor(owners, dtype=torch.long), **extra)


def user_example(user: UserData, position: int, candidates: Sequence[str], *, max_history: int,
                 parts: InterestConfig, seed: int = 0) -> Example:
    """The example predicting the item at ``position`` of the user's positive sequence (train items,
    then the validation and test targets; ``position`` = its length: after the last) from what came
    before it: the last ``max_history`` items,
    and -- only where a part reads them -- their behaviour labels, the texts the user had written
    by then (``text_pos <= position``) and the neighbours' items."""
    sequence = user.train_items + (user.valid_target, user.test_target)
    if not 1 <= position <= len(sequence):
        raise ValueError(f"user {user.user_id!r}: no history before position {position}")
    start = max(0, position - max_history)
    history = sequence[start:position]
    behaviors: tuple[int, ...] = ()
    if parts.task_heads:
        behaviors = tuple(label_index(user.behaviors[j]) if j < len(user.behaviors) else -1
                          for j in range(start, position))
    views = parts.view_names
    texts = tuple(t for t, p in zip(user.texts, user.text_pos) if p <= position)[-max_history:] \
        if "text" in views else ()
    social = user.social_items[-max_history:] if "social" in views else ()
    return Example(history=tuple(history), candidates=tuple(candidates), behaviors=behaviors, texts=texts,
                   social=social, seed=seed)


def eval_example(user: UserData, split: str, *, max_history: int, parts: InterestConfig) -> Example:
    """The fixed validation or test example of a user (its candidates, positive first), or
    (``full``) the user's whole sequence as history with no candidates."""
    n = len(user.train_items)
    if split == "full":
        return user_example(user, n + 2, (), max_history=max_history, parts=parts)
    if split == "test":
        return user_example(user, n + 1, user.test_candidates, max_history=max_history, parts=parts)
    return user_example(user, n, user.valid_candidates, max_history=max_history, parts=parts)
