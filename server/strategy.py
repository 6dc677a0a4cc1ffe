"""FedAvg over adapter arrays, with every update validated before it is aggregated.

Flower's FedAvg does the averaging; this subclass adds what a coordinator of silos needs:
- replies that refused to train (privacy budget exhausted, ledger damaged, a round asked twice) are
  left out, not averaged in, and the silo's reason is logged and recorded;
- an update must carry exactly the trainable arrays with the global model's shapes and dtypes,
  all finite, and change the model by at most ``max_update_norm`` (L2), or it is rejected;
- frozen adapter parts (FFA-LoRA's A matrices) are kept from the global model;
- per-silo training/evaluation metrics are handed to ``on_train`` / ``on_evaluate`` callbacks;
- the popularity prior, when the run has one, travels next to the adapter arrays in every train
  and evaluate message (under :data:`~uirl.federated.PRIOR_ARRAY`) and is never aggregated.

:class:`TrainableCentralDP` adds Flower's client-level central DP on top (run config ``central-dp``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.supercore import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from uirl.aggregation import UpdateRejected, check_update
from uirl.config import Config
from uirl.engine import central_noise
from uirl.federated import PRIOR_ARRAY, STATUS_OK
from uirl.privacy.central import central_epsilon


def _as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


class ValidatingFedAvg(FedAvg):
    def __init__(self, *, trainable: set[str], max_update_norm: float,
                 on_train: Callable[[int, list[dict]], None], on_evaluate: Callable[[int, list[dict], dict], None],
                 prior: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trainable = trainable
        self.max_update_norm = max_update_norm
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.prior = prior
        self._global: dict[str, np.ndarray] = {}

    def with_prior(self, arrays: ArrayRecord) -> ArrayRecord:
        """What a silo receives: the global arrays, plus the popularity prior if the run has one."""
        if self.prior is None:
            return arrays
        return ArrayRecord({**dict(arrays.items()), PRIOR_ARRAY: Array(self.prior)})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._global = _as_numpy(arrays)
        return super().configure_train(server_round, self.with_prior(arrays), config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, self.with_prior(arrays), config, grid)

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


class TrainableCentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's client-level central DP (server-side fixed clipping + Gaussian noise) over the
    arrays that travel.

    Flower's wrapper clips each reply against the global arrays position by position and noises
    every aggregated array. Our replies carry only the trainable arrays (FFA-LoRA's frozen A never
    travels), so clipping must compare against that subset, and the frozen arrays that
    :class:`ValidatingFedAvg` merges back must stay noise-free.
    """

    def __init__(self, strategy: ValidatingFedAvg, **kwargs) -> None:
        super().__init__(strategy, **kwargs)
        self.trainable = strategy.trainable

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.current_arrays = ArrayRecord({n: a for n, a in arrays.items() if n in self.trainable})
        return messages

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        noised = super()._add_noise_to_aggregated_arrays(
            ArrayRecord({n: a for n, a in aggregated_arrays.items() if n in self.trainable}))
        merged = dict(aggregated_arrays.items())
        merged.update(noised.items())
        return ArrayRecord(merged)


def with_central_dp(strategy: ValidatingFedAvg, cfg: Config) -> ValidatingFedAvg | TrainableCentralDP:
    """Wrap ``strategy`` in client-level central DP when the run config asks for it (``central-dp``).

    The noise is sized for ``num_sampled_clients = fraction-train x min-nodes`` replies: if more
    silos reply, the noise is larger than needed, never smaller. The epsilon printed assumes every
    silo trains every round (``fraction-train = 1``) or Poisson sampling; Flower samples a fixed
    number of nodes, for which the sampling amplification is not proven.
    """
    fed = cfg.federation
    if not fed.central_dp:
        return strategy
    sigma = central_noise(cfg)
    eps = central_epsilon(noise_multiplier=sigma, sample_rate=fed.fraction_train, rounds=fed.num_rounds,
                          delta=cfg.privacy.target_delta)
    print(f"uirl: client-level central DP: noise multiplier {sigma:.4g}, clip {fed.central_clip:g}, "
          f"epsilon {eps:.3f} after {fed.num_rounds} rounds (delta {cfg.privacy.target_delta:g})", flush=True)
    return TrainableCentralDP(strategy, noise_multiplier=sigma, clipping_norm=fed.central_clip,
                              num_sampled_clients=max(1, int(fed.fraction_train * fed.min_nodes)))
