"""Per-USER gradients with Opacus hooks.

Opacus computes one gradient per ROW of each layer's input. Our encoder sees all texts of all
users as rows (N = sum of texts per user), while the interest head sees one row per user (B).
A user-level guarantee needs one gradient per user, so after the backward pass on the summed loss
we add up each user's rows (``index_add`` by ``row_user``). Any other row count is a bug that
would silently change the privacy unit, so it raises.
"""

from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule

from uirl.model.interest import InterestModel, UserBatch
from uirl.privacy.accountant import PrivacyError


class PerUserGradients:
    """Wraps an :class:`InterestModel` with Opacus hooks for one local training session.

    Usage: ``losses = pug.loss(batch); pug.backward(losses, batch)`` -- after which
    every trainable ``p.grad_sample`` has shape ``(B, *p.shape)``, row b being user b's gradient of
    its own loss. Call :meth:`close` to detach the hooks.
    """

    def __init__(self, model: InterestModel) -> None:
        self.model = model
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def backward(self, losses: torch.Tensor, batch: UserBatch) -> None:
        """Backward on the summed per-user losses, then :meth:`regroup` to one row per user."""
        with warnings.catch_warnings():
            # Opacus's backward hooks on a frozen-input layer (the first LoRA layer) are expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        self.regroup(batch)

    def loss(self, batch: UserBatch, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Per-user losses (B,); ``vectors``: the rows' cached text vectors (frozen encoder)."""
        return self.gsm(batch, vectors)["loss"]

    def regroup(self, batch: UserBatch) -> None:
        num_users, num_rows = batch.num_users, int(batch.row_user.shape[0])
        for p in self.params:
            gs = p.grad_sample
            if gs is None or isinstance(gs, list):
                raise PrivacyError("per-sample gradient missing or accumulated over several passes")
            if gs.shape[0] == num_rows and num_rows != num_users:
                per_user = torch.zeros((num_users, *gs.shape[1:]), dtype=gs.dtype, device=gs.device)
                per_user.index_add_(0, batch.row_user.to(gs.device), gs)
                gs = per_user
            if gs.shape[0] != num_users:
                raise PrivacyError(f"per-sample gradient has {gs.shape[0]} rows, expected {num_users} users "
                                   f"(or {num_rows} text rows)")
            p.grad_sample = gs

    def empty(self) -> None:
        """Zero users sampled (Poisson): give the optimizer empty per-user gradients -> noise-only step."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def close(self) -> None:
        self.gsm.remove_hooks()
        for p in self.params:
            p.grad_sample = None
            for attr in ("_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        for module in self.model.modules():
            if hasattr(module, "activations"):
                delattr(module, "activations")
