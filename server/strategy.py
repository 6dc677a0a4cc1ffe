"""FedAvg over adapter arrays, with every update validated before it is aggregated.

Flower's FedAvg does the averaging; this subclass adds what a coordinator of silos needs:
- replies that refused to train (privacy budget exhausted, ledger damaged, a round asked twice) are
  left out, not averaged in, and the silo's reason is logged and recorded;
- an update must carry exactly the trainable arrays with the global model's shapes and dtypes,
  all finite, and change the model by at most ``max_update_norm`` (L2), or it is rejected;
- frozen adapter parts (FFA-LoRA's A matrices) are kept from the global model;
- per-silo training/evaluation metrics are handed to ``on_train`` / ``on_evaluate`` callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.supercore import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from uirl.federated import STATUS_OK


class UpdateRejected(ValueError):
    pass


def check_update(update: dict[str, np.ndarray], current: dict[str, np.ndarray], trainable: set[str],
                 max_norm: float) -> None:
    """Raise :class:`UpdateRejected` naming the problem if ``update`` is not a sane adapter update."""
    if set(update) != trainable:
        extra, missing = sorted(set(update) - trainable), sorted(trainable - set(update))
        raise UpdateRejected(f"array names differ from the trainable set (extra {extra[:3]}, missing {missing[:3]})")
    total = 0.0
    for name, value in update.items():
        ref = current[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise UpdateRejected(f"{name}: {value.dtype}{list(value.shape)} != {ref.dtype}{list(ref.shape)}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{name}: non-finite values")
        total += float(np.sum((value.astype(np.float64) - ref) ** 2))
    if total ** 0.5 > max_norm:
        raise UpdateRejected(f"update L2 norm {total ** 0.5:.3g} exceeds max-update-norm {max_norm:g}")


def _as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


class ValidatingFedAvg(FedAvg):
    def __init__(self, *, trainable: set[str], max_update_norm: float,
                 on_train: Callable[[int, list[dict]], None], on_evaluate: Callable[[int, list[dict], dict], None],
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.trainable = trainable
        self.max_update_norm = max_update_norm
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self._global: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._global = _as_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, per_silo = [], []
        for msg in replies:
            if msg.has_error():
                accepted.append(msg)  # FedAvg logs errors and skips them
                continue
            metrics = dict(msg.content["metrics"]) if "metrics" in msg.content.metric_records else {}
            node = msg.metadata.src_node_id
            metrics["node-id"] = node
            if metrics.get("status", STATUS_OK) != STATUS_OK:
                if "error" in msg.content.config_records:
                    metrics["error"] = str(msg.content["error"].get("message", ""))
                    log(WARNING, "round %d: node %d refused to train: %s", server_round, node, metrics["error"])
                per_silo.append({**metrics, "accepted": False})
                continue
            try:
                if "arrays" not in msg.content.array_records:
                    raise UpdateRejected("no arrays in a reply with status ok")
                check_update(_as_numpy(msg.content["arrays"]), self._global, self.trainable, self.max_update_norm)
            except UpdateRejected as why:
                log(WARNING, "round %d: rejected the update of node %d: %s", server_round, node, why)
                per_silo.append({**metrics, "accepted": False, "rejected": str(why)})
                continue
            accepted.append(msg)
            per_silo.append({**metrics, "accepted": True})
        arrays, metrics = (None, None)
        if any(not m.has_error() for m in accepted):
            arrays, metrics = super().aggregate_train(server_round, accepted)
        self.on_train(server_round, per_silo)
        if arrays is None:
            return None, metrics
        # Frozen adapter parts (e.g. FFA-LoRA's A) never travel back; keep them from the global model.
        merged = {name: Array(value) for name, value in self._global.items()}
        merged.update(arrays.items())
        return ArrayRecord(merged), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        aggregated = super().aggregate_evaluate(server_round, replies)
        per_silo = [{**dict(m.content["metrics"]), "node-id": m.metadata.src_node_id}
                    for m in replies if not m.has_error()]
        self.on_evaluate(server_round, per_silo, dict(aggregated) if aggregated is not None else {})
        return aggregated
