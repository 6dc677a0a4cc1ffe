"""The switchable parts of the multi-facet interest model, each a small ``nn.Module``.

- :class:`LevelHeads`   multi-granularity: event (last text) -> short-term (recent window) levels
                        below the long-term top level, which takes the short-term one as context;
- :class:`FacetPooling` multi-interest: K facet vectors from learned queries over the history;
- :class:`FacetHeads`   facets predict the categories (topics) of the events they attend to;
- :class:`ViewFusion`   multi-view: W_i aligns each view to the fused V_u, learned gate weights;
- :class:`TaskHeads`    multi-task: behaviour type (click/like/purchase/rating bucket) per event;
- :class:`VaeHead`      mean/log-variance of the top-level interest, KL to N(0, I).

Rules that keep per-user gradients exact (Opacus hooks, see :mod:`uirl.privacy.per_user`): only
``nn.Linear`` layers, each called ONCE per forward pass on an input whose first dimension is the
user (B, ...); every loss term is a function of one user's own rows; no batch statistics. Every
part starts where the plain model is (zero-initialised residuals, identity alignments), so
switching a part on does not throw away the pretrained encoder's zero-shot ranking.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from uirl.model.pooling import AttentionPooling

#: Category names are hashed into this many buckets (the head's width does not depend on the data).
CATEGORY_BUCKETS = 128


def category_bucket(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) % CATEGORY_BUCKETS


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, d) + (B, N) bool -> (B, d); zero for a user with no entry."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` is True; all-masked rows give zeros (never NaN)."""
    weights = torch.softmax(logits.masked_fill(~mask, -1e30), dim=dim)
    return weights * mask.to(weights.dtype)


def unit_norms(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (...) the norms ``F.normalize`` divides by (clamped at its eps, 1e-12)."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)


def ranking_loss(users: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, d) users x (B, C, d) candidates (positive first) -> (B,) cross-entropy of the positive."""
    logits = torch.einsum("bd,bcd->bc", F.normalize(users, dim=-1), F.normalize(items, dim=-1)) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device),
                           reduction="none")


class LevelHeads(nn.Module):
    """Lower levels of the hierarchy: ``event`` = the most recent history text, ``short`` = attention
    pooling over the last ``window`` events. ``context`` (zero-initialised) feeds the short-term
    vector into the long-term one, so the top level is built on the level below it."""

    def __init__(self, dim: int, levels: tuple[str, ...], window: int) -> None:
        super().__init__()
        self.levels = tuple(level for level in ("event", "short") if level in levels)
        self.window = window
        if "short" in self.levels:
            self.short_pool = AttentionPooling(dim)
            self.context = nn.Linear(dim, dim)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, d) right-padded history + (B, H) mask -> {level: (B, d)}."""
        count = mask.long().sum(1)
        out = {}
        if "event" in self.levels:
            last = (count - 1).clamp(min=0)
            out["event"] = history[torch.arange(history.shape[0], device=history.device), last]
        if "short" in self.levels:
            pos = torch.arange(history.shape[1], device=history.device).unsqueeze(0)
            recent = mask & (pos >= (count - self.window).unsqueeze(1))
            out["short"] = self.short_pool(history, recent)
        return out

    def long_context(self, levels: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.context(levels["short"]) if "short" in levels else 0.0


class FacetPooling(nn.Module):
    """K interest facets: facet k = softmax_h(q_k . e_h) weighted sum of the history events.

    The queries are the rows of one ``nn.Linear(d, K)`` (one call on (B, H, d): per-user
    gradients by Opacus's hooks). They start random (std 1, so facets differ from the start)."""

    def __init__(self, dim: int, k: int, how: str) -> None:
        super().__init__()
        self.queries = nn.Linear(dim, k, bias=False)
        nn.init.normal_(self.queries.weight, std=1.0)
        self.how = how

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> facets (B, K, d) unit norm, attention weights (B, K, H)."""
        logits = self.queries(history).transpose(1, 2)  # (B, K, H)
        weights = masked_softmax(logits, mask.unsqueeze(1), dim=-1)
        return F.normalize(torch.einsum("bkh,bhd->bkd", weights, history), dim=-1), weights

    def score(self, facets: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
        """(B, K, d) facets x (B, C, d) items -> (B, C) logits: the best facet (``max``) or the
        facets weighted by their softmax match with the item (``attention``)."""
        cos = torch.einsum("bkd,bcd->bkc", F.normalize(facets, dim=-1), items) / (
            unit_norms(items).unsqueeze(1) * temperature)
        if self.how == "max":
            return cos.max(dim=1).values
        return (torch.softmax(cos, dim=1) * cos).sum(1)


class FacetHeads(nn.Module):
    """Facet k predicts the categories of the events it attends to (soft labels = its attention),
    which ties facets to topics. Categories are hashed (:func:`category_bucket`); events without
    a category (-1) do not count; a user without any gets loss 0."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, CATEGORY_BUCKETS)

    def forward(self, facets: torch.Tensor, weights: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """facets (B, K, d), weights (B, K, H), category (B, H) -> (B,) loss."""
        logp = torch.log_softmax(self.head(facets), dim=-1)  # (B, K, buckets)
        known = category >= 0
        idx = category.clamp(min=0).unsqueeze(1).expand(-1, facets.shape[1], -1)  # (B, K, H)
        nll = -torch.gather(logp, 2, idx)  # (B, K, H)
        w = weights * known.unsqueeze(1).to(weights.dtype)
        return (w * nll).sum((1, 2)) / w.sum((1, 2)).clamp(min=1e-12)


class ViewFusion(nn.Module):
    """Fuse per-view user vectors V_i into V_u = normalize(sum_i a_i W_i V_i), a_i a masked softmax
    of a learned gate over the present views (with two views: the alpha/beta fusion weights).

    Per user: align = sum_i m_i ||V_u - W_i V_i||^2 over the views the user has (m_i), and
    frob = sum_i ||W_i||_F^2. W_i start as the identity (the views share the encoder's space).
    The Frobenius term is computed as ||W_i I||^2 from the same single call of W_i on
    [V_i; I] so that Opacus's hooks see it in each user's gradient (it is data-independent)."""

    def __init__(self, dim: int, views: tuple[str, ...], image_dim: int = 0) -> None:
        super().__init__()
        self.views = views
        self.align = nn.ModuleDict({v: nn.Linear(dim, dim, bias=False) for v in views})
        for layer in self.align.values():
            nn.init.eye_(layer.weight)
        self.gate = nn.Linear(dim, 1, bias=False)  # softmax over views: a shared bias would do nothing
        nn.init.zeros_(self.gate.weight)
        if "image" in views:
            self.image_proj = nn.Linear(image_dim, dim)  # image features -> the text space

    def image_view(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, F) features of the history items + (B, H) mask -> (B, d)."""
        return masked_mean(self.image_proj(image), mask)

    def forward(self, views: dict[str, torch.Tensor], present: dict[str, torch.Tensor], *, with_frob: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """views: name -> (B, d); present: name -> (B,) bool. -> (V_u (B, d), align (B,), frob (B,))."""
        first = views[self.views[0]]
        batch, dim = first.shape
        eye = torch.eye(dim, dtype=first.dtype, device=first.device).expand(batch, dim, dim)
        aligned, frob = [], first.new_zeros(batch)
        for name in self.views:
            x = views[name].unsqueeze(1)
            out = self.align[name](torch.cat([x, eye], dim=1) if with_frob else x)
            aligned.append(out[:, 0])
            if with_frob:
                frob = frob + out[:, 1:].pow(2).sum((1, 2))
        z = torch.stack(aligned, dim=1)  # (B, V, d)
        mask = torch.stack([present[v] for v in self.views], dim=1)  # (B, V)
        a = masked_softmax(self.gate(z).squeeze(-1), mask, dim=-1)
        fused = F.normalize((a.unsqueeze(-1) * z).sum(1), dim=-1)
        align = ((fused.unsqueeze(1) - z).pow(2).sum(-1) * mask.to(z.dtype)).sum(1)
        return fused, align, frob


class TaskHeads(nn.Module):
    """Behaviour type of each history event from (user, event): a small MLP shared by all events.
    Labels index :data:`uirl.data.views.BEHAVIOR_LABELS`; -1 = unknown (ignored)."""

    def __init__(self, dim: int, num_labels: int, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, user: torch.Tensor, events: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """user (B, d), events (B, H, d), labels (B, H) -> (B,) mean cross-entropy over known labels."""
        x = torch.cat([user.unsqueeze(1).expand_as(events), events], dim=-1)
        logits = self.out(torch.tanh(self.hidden(x)))  # (B, H, L)
        known = labels >= 0
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, H)
        return (nll * known).sum(1) / known.sum(1).clamp(min=1)


class VaeHead(nn.Module):
    """q(z | u) = N(mu, diag(exp(logvar))), mu = u + M u (M zero-initialised), KL to N(0, I) per
    dimension. Training samples z = mu + sigma * eps with eps drawn from a generator seeded per
    user (``seeds``), so a user's sample does not depend on who else is in the batch; inference
    uses mu. logvar starts so that the noise norm is about 0.1 (the user vector has norm 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mean = nn.Linear(dim, dim)
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)
        self.logvar = nn.Linear(dim, dim)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, 2 * math.log(0.1 / math.sqrt(dim)))

    def forward(self, user: torch.Tensor, seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) -> (z (B, d), KL (B,)). ``seeds`` (B,) given = sample; None = the mean."""
        mu = user + self.mean(user)
        logvar = self.logvar(user)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(-1)
        if seeds is None:
            return mu, kl
        eps = torch.stack([torch.randn(mu.shape[1], generator=torch.Generator().manual_seed(int(s)),
                                       dtype=mu.dtype) for s in seeds.tolist()]).to(mu.device)
        return mu + (0.5 * logvar).exp() * eps, kl
