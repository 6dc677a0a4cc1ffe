"""Per-USER gradients with Opacus hooks.

Opacus computes one gradient per ROW of each layer's input. Our encoder sees all texts of all
users as rows (N = sum of texts per user), while the interest head sees one row per user (B).
A user-level guarantee needs one gradient per user, so after the backward pass on the summed loss
we add up each example's rows (``index_add`` by ``row_user``) and, where a user has several
examples (``user-examples``), each user's examples (by ``example_user``; their losses were
weighted by 1/count, so the sum is the gradient of the user's mean loss). Any other row count is a
bug that would silently change the privacy unit, so it raises.
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
        encoder = {id(p) for p in model.encoder.parameters()}
        self.encoder_params = [p for p in self.params if id(p) in encoder]
        self._calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rows: torch.Tensor | None = None

    def backward(self, losses: torch.Tensor, batch: UserBatch) -> None:
        """Backward on the summed per-user losses (per-example losses already weighted by
        :meth:`UserBatch.example_weight` where users have several), then :meth:`regroup` to one
        row per user."""
        with warnings.catch_warnings():
            # Opacus's backward hooks on a frozen-input layer (the first LoRA layer) are expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
            if self._calls:
                self._encoder_backward()
        self.regroup(batch)

    def loss_in_buckets(self, batch: UserBatch, buckets: int) -> torch.Tensor:
        """Per-example losses like :meth:`loss` (tokens encoded here), the texts encoded in
        ``buckets`` calls of similar length (:meth:`InterestModel.encode_in_buckets`).

        Opacus adds the per-row gradients of a layer's repeated calls into the same leading rows, so
        one backward through every call would mix the rows of different calls (different users).
        The interest model therefore reads detached copies of the vectors; :meth:`backward` first
        backpropagates the loss to those copies (the interest model's own per-user gradients), then
        each call's vector gradients through the encoder, one call at a time, last call first (the
        order Opacus pops each layer's stored inputs in), and takes that call's per-row gradients
        before the next. The rows are put back in batch order: the per-row gradients are those of
        one call, and :meth:`regroup` sums them per user as before."""
        vectors, self._calls = self.model.encode_in_buckets(batch.input_ids, batch.attention_mask, buckets)
        self._rows = vectors.detach().requires_grad_(True)
        return self.gsm(batch, self._rows)["loss"]

    def _encoder_backward(self) -> None:
        calls, rows, self._calls, self._rows = self._calls, self._rows, [], None
        if rows.grad is None:
            raise PrivacyError("the loss does not reach the encoded texts")
        parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(p): [] for p in self.encoder_params}
        for index, (call_rows, vectors) in enumerate(reversed(calls)):
            vectors.backward(rows.grad[call_rows])
            last = index == len(calls) - 1  # Opacus moves the last call's rows to grad_sample itself
            for p in self.encoder_params:
                got = p.grad_sample if last else getattr(p, "_current_grad_sample", None)
                if got is None or isinstance(got, list):
                    raise PrivacyError("per-row encoder gradient missing or accumulated over several passes")
                parts[id(p)].append((call_rows, got[:len(call_rows)]))
                if not last:
                    delattr(p, "_current_grad_sample")
        for p in self.encoder_params:
            first = parts[id(p)][0][1]
            full = first.new_zeros((rows.shape[0], *first.shape[1:]))
            for call_rows, got in parts[id(p)]:
                full[call_rows.to(full.device)] = got
            p.grad_sample = full

    def loss(self, batch: UserBatch, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example losses (B,: one per user unless users have several examples); ``vectors``:
        the rows' cached text vectors (frozen encoder)."""
        return self.gsm(batch, vectors)["loss"]

    def regroup(self, batch: UserBatch) -> None:
        num_users, num_examples, num_rows = batch.num_users, batch.num_examples, int(batch.row_user.shape[0])
        for p in self.params:
            gs = p.grad_sample
            if gs is None or isinstance(gs, list):
                raise PrivacyError("per-sample gradient missing or accumulated over several passes")
            if gs.shape[0] == num_rows and num_rows != num_examples:
                gs = _sum_by(gs, batch.row_user, num_examples)
            if batch.example_user is not None and gs.shape[0] == num_examples:
                gs = _sum_by(gs, batch.example_user, num_users)
            if gs.shape[0] != num_users:
                raise PrivacyError(f"per-sample gradient has {gs.shape[0]} rows, expected {num_users} users "
                                   f"(or {num_examples} examples, or {num_rows} text rows)")
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


def _sum_by(rows: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """(count, ...) the sum of ``rows`` grouped by ``owner`` (each row's group, 0..count-1)."""
    out = torch.zeros((count, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, owner.to(rows.device), rows)
