"""The interest model: history texts -> event vectors -> user interest; score = cosine / temperature.

One forward pass encodes every text of every user in the batch as one (N, T) tensor, user-major:
the user's history items, candidates, own written texts and neighbours' items. Every quantity in a
user's loss is computed from that user's own rows (own history, own candidates; no in-batch
negatives, no batch statistics), which is what makes per-user gradients exact and user-level DP
true.

With every part off (the default) the model is the plain one: attention pooling + a residual
projection -> one unit user vector. The parts of :mod:`uirl.model.parts` switch on from
:class:`~uirl.config.InterestConfig`, composed in this order:

  events -> levels (event, short -> long) -> views (behavior = long level, text, social, image)
  fused -> VAE -> top-level interest; facets (learned queries over the events) + the top level
  score the candidates; behaviour heads read (top level, event).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from uirl.config import InterestConfig
from uirl.data.views import BEHAVIOR_LABELS
from uirl.model.encoder import Encoder
from uirl.model.parts import (FacetHeads, FacetPooling, LevelHeads, TaskHeads, VaeHead, ViewFusion, masked_mean,
                              ranking_loss, unit_norms)
from uirl.model.pooling import AttentionPooling, pool_tokens


@dataclass
class UserBatch:
    """B users' texts, flattened.

    Shapes: ``input_ids``/``attention_mask`` (N, T); ``row_user`` (N,) which user owns each row;
    ``history_index``/``history_mask`` (B, H) rows of each user's history (padding repeats one of the
    user's own rows and is masked); ``candidate_index`` (B, C) rows of each user's candidates with
    the positive at column 0. Optional (None unless the examples carry them): ``history_label``
    (B, H) behaviour label per history event (-1 unknown), ``history_category`` (B, H) hashed item
    category (-1 none), ``text_index``/``text_mask`` (B, X) rows of the user's own texts,
    ``social_index``/``social_mask`` (B, S) rows of neighbours' items, ``history_image``/
    ``image_mask`` (B, H, F)/(B, H) image features of the history items, ``noise_seed`` (B,)
    per-user seeds for the VAE's sampling, ``candidate_prior`` (B, C) the popularity prior of each
    candidate. ``row_keys`` names each row's text (for cached vectors).

    A user may have several examples (``user-examples``): then B counts examples,
    ``row_user`` names each row's example, and ``example_user`` (B,) each example's user (0..U-1,
    in order); None means example b is user b.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_user: torch.Tensor
    history_index: torch.Tensor
    history_mask: torch.Tensor
    candidate_index: torch.Tensor
    history_label: torch.Tensor | None = None
    history_category: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    social_index: torch.Tensor | None = None
    social_mask: torch.Tensor | None = None
    history_image: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    noise_seed: torch.Tensor | None = None
    candidate_prior: torch.Tensor | None = None
    row_keys: list[str] = field(default_factory=list)
    example_user: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.history_index.shape[0])

    @property
    def num_users(self) -> int:
        if self.example_user is None:
            return self.num_examples
        return int(self.example_user.max()) + 1 if self.example_user.numel() else 0

    def example_weight(self) -> torch.Tensor | None:
        """(B,) 1 / (number of examples of the example's user): weighting the per-example losses by
        it makes each user's loss the mean of its examples' losses. None: one example per user."""
        if self.example_user is None:
            return None
        counts = torch.bincount(self.example_user, minlength=self.num_users).to(torch.float64)
        return 1.0 / counts[self.example_user]

    def to(self, device: torch.device | str) -> "UserBatch":
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in dataclasses.fields(self)}
        return UserBatch(**moved)


@dataclass
class UserRep:
    """What the model knows about B users: the top-level ``interest`` (B, d) used for scoring,
    ``facets`` (B, K, d) or None, lower ``levels`` and per-``views`` vectors (name -> (B, d)),
    which views each user has (``present``), and per-user auxiliary losses (name -> (B,))."""

    interest: torch.Tensor
    facets: torch.Tensor | None = None
    facet_weights: torch.Tensor | None = None
    levels: dict[str, torch.Tensor] = field(default_factory=dict)
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class LowRankResidual(nn.Module):
    """x -> up(down(x)), rank r: a residual that starts at exactly zero (``up`` is zero) and costs
    2 r d numbers instead of d^2 -- what travels and what DP noise is added to shrink with it."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.normal_(self.down.weight, std=dim ** -0.5)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class InterestModel(nn.Module):
    def __init__(self, encoder: Encoder, *, temperature: float, interest: InterestConfig | None = None,
                 user_proj_rank: int = 0, item_proj_rank: int = 0, prior_weight: float | None = None,
                 train_encoder: bool = True) -> None:
        super().__init__()
        self.encoder = encoder.model
        self.pooling = encoder.pooling
        self.temperature = temperature
        self.parts = interest or InterestConfig()
        dim = encoder.hidden_size
        self.history_pool = AttentionPooling(dim)
        # Residual user projection, zero-initialised: lets the user side learn which topics
        # co-occur (a preference, not a text similarity) without changing the zero-shot start.
        if user_proj_rank:
            self.user_proj = LowRankResidual(dim, user_proj_rank)
        else:
            self.user_proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.user_proj.weight)
            nn.init.zeros_(self.user_proj.bias)
        # Parts are created after the plain heads, so the plain heads' initial values never change.
        p = self.parts
        self.levels = LevelHeads(dim, p.level_names, p.short_window) if p.level_names else None
        views = p.view_names
        self.fusion = ViewFusion(dim, views, p.image_dim) if len(views) > 1 else None
        self.vae = VaeHead(dim) if p.vae else None
        self.facets = FacetPooling(dim, p.facets, p.facet_score) if p.facets else None
        self.facet_heads = FacetHeads(dim) if p.facet_heads else None
        self.tasks = TaskHeads(dim, len(BEHAVIOR_LABELS)) if p.task_heads else None
        # Item side: a residual projection of every item vector (shared by all users' rows), and the
        # learned weight of the released popularity prior (a 1x1 linear map, so Opacus sees a layer).
        self.item_proj = LowRankResidual(dim, item_proj_rank) if item_proj_rank else None
        self.prior_weight = None
        if prior_weight is not None:
            self.prior_weight = nn.Linear(1, 1, bias=False)
            nn.init.constant_(self.prior_weight.weight, prior_weight)
        if not train_encoder:
            # Cached-vector training: the encoder (LoRA included) stays as released, so item vectors
            # can be computed once; only the heads above learn and travel.
            for p_ in self.encoder.parameters():
                p_.requires_grad_(False)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) tokens -> (N, d) unit-norm text vectors."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(pool_tokens(out.last_hidden_state, attention_mask, self.pooling), dim=-1)

    def encode_in_buckets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, buckets: int
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`encode_texts` of (N, T) right-padded rows in ``buckets`` calls: rows sorted by token
        length, each call cut to its own longest row, so short texts are not padded to the batch's
        longest. A text's vector does not depend on the other rows of its call or on padding (the
        attention mask hides it; pooling is masked), so the vectors are the one-call vectors.
        Returns the (N, d) vectors in row order and each call's (row indices, (n_b, d) vectors)."""
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        calls = []
        for rows in torch.tensor_split(order, min(buckets, len(order))):
            width = int(lengths[rows].max())
            calls.append((rows, self.encode_texts(input_ids[rows, :width], attention_mask[rows, :width])))
        vectors = torch.cat([v for _, v in calls])[torch.argsort(torch.cat([rows for rows, _ in calls]))]
        return vectors, calls

    def user_vectors(self, history: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | float = 0.0
                     ) -> torch.Tensor:
        """(B, H, d) history event vectors + (B, H) mask -> (B, d) unit-norm (long-term) user vectors."""
        pooled = self.history_pool(history, mask)
        return F.normalize(pooled + self.user_proj(pooled) + context, dim=-1)

    def item_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Encoder text vectors (..., d) -> the item representation the model scores (unit norm):
        the vectors themselves, or with the residual item projection when it is on."""
        if self.item_proj is None:
            return vectors
        return F.normalize(vectors + self.item_proj(vectors), dim=-1)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, d) users x (B, C, d) items -> (B, C) logits: cos(user, item) / temperature for unit
        users. Dividing the dot products by the item norms (rather than normalising the items first)
        never materialises a normalised copy of ``items``: against a whole catalogue, that copy per
        user was most of an evaluation's memory."""
        return torch.einsum("bd,bcd->bc", users, items) / (unit_norms(items) * self.temperature)

    def score_rep(self, rep: UserRep, items: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate logits (B, C) from a :class:`UserRep`: the facets (with the top level as one
        of them) when facets are on, else the top-level interest; plus ``w * prior`` (B, C) when
        the model has a popularity prior (a missing ``prior`` counts as zero)."""
        if rep.facets is None:
            logits = self.score(rep.interest, items)
        else:
            every = torch.cat([rep.interest.unsqueeze(1), rep.facets], dim=1)
            logits = self.facets.score(every, items, self.temperature)
        if self.prior_weight is not None and prior is not None:
            logits = logits + self.prior_weight(prior.to(logits.dtype).unsqueeze(-1)).squeeze(-1)
        return logits

    def represent(self, batch: UserBatch, events: torch.Tensor, *, sample: bool = False) -> UserRep:
        """Build each user's interest from ``events`` (N, d): the batch's row vectors (fresh from
        the encoder in training, cached item vectors at evaluation). ``sample``: VAE sampling."""
        p = self.parts
        history, hmask = events[batch.history_index], batch.history_mask
        rep = UserRep(interest=events.new_zeros(0))
        context: torch.Tensor | float = 0.0
        if self.levels is not None:
            rep.levels = self.levels(history, hmask)
            context = self.levels.long_context(rep.levels)
        behavior = self.user_vectors(history, hmask, context)
        rep.levels["long"] = behavior
        top = behavior
        if self.fusion is not None:
            everyone = torch.ones(len(behavior), dtype=torch.bool, device=behavior.device)
            rep.views, rep.present = {"behavior": behavior}, {"behavior": everyone}
            for name, index, mask in (("text", batch.text_index, batch.text_mask),
                                      ("social", batch.social_index, batch.social_mask)):
                if name in self.fusion.views:
                    if index is None:
                        rep.views[name] = torch.zeros_like(behavior)
                        rep.present[name] = ~everyone
                    else:
                        rep.views[name] = masked_mean(events[index], mask)
                        rep.present[name] = mask.any(1)
            if "image" in self.fusion.views:
                if batch.history_image is None:
                    rep.views["image"], rep.present["image"] = torch.zeros_like(behavior), ~everyone
                else:
                    imask = batch.image_mask & hmask
                    rep.views["image"] = self.fusion.image_view(batch.history_image.to(behavior.dtype), imask)
                    rep.present["image"] = imask.any(1)
            top, align, frob = self.fusion(rep.views, rep.present, with_frob=p.view_align_lambda > 0)
            rep.aux["view-align"] = p.view_align_weight * (align + p.view_align_lambda * frob)
        if self.vae is not None:
            seeds = batch.noise_seed if sample else None
            if sample and seeds is None:
                raise ValueError("VAE sampling needs per-user noise seeds in the batch")
            top, kl = self.vae(top, seeds)
            rep.aux["vae-kl"] = p.vae_beta * kl
            top = F.normalize(top, dim=-1)
        rep.interest = top
        if self.facets is not None:
            rep.facets, rep.facet_weights = self.facets(history, hmask)
        return rep

    def forward(self, batch: UserBatch, vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-user losses, name -> (B,): ``rank`` (softmax cross-entropy of the positive among the
        user's own candidates), the enabled parts' terms, and their sum ``loss``.

        ``vectors`` (N, d): the rows' text vectors when they are cached (frozen encoder); else the
        rows' tokens are encoded here. Either way each row belongs to one user (``row_user``)."""
        if vectors is None:
            vectors = self.encode_texts(batch.input_ids, batch.attention_mask)
        events = self.item_vectors(vectors)
        rep = self.represent(batch, events, sample=self.training)
        candidates = events[batch.candidate_index]
        logits = self.score_rep(rep, candidates, batch.candidate_prior)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        losses = {"rank": F.cross_entropy(logits, target, reduction="none"), **rep.aux}
        p = self.parts
        lower = [rep.levels[name] for name in ("event", "short") if name in rep.levels]
        if lower:
            losses["levels"] = p.level_weight * torch.stack(
                [ranking_loss(v, candidates, self.temperature) for v in lower]).mean(0)
        if self.facet_heads is not None:
            if batch.history_category is None:
                raise ValueError("facet heads need item categories in the batch")
            losses["facet-heads"] = p.task_weight * self.facet_heads(rep.facets, rep.facet_weights,
                                                                     batch.history_category)
        if self.tasks is not None:
            if batch.history_label is None:
                raise ValueError("behaviour heads need behaviour labels in the batch")
            losses["tasks"] = p.task_weight * self.tasks(rep.interest, events[batch.history_index],
                                                         torch.where(batch.history_mask, batch.history_label, -1))
        losses["loss"] = torch.stack(list(losses.values())).sum(0)
        return losses

    def batch_loss(self, batch: UserBatch, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """The per-user total loss (B,)."""
        return self(batch, vectors)["loss"]

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
