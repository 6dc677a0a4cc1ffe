"""What a run's privacy guarantee is, and what leaves a silo, in words: the one place the model
card, the console and the README's claims come from.

The guarantee covers what the DP mechanisms produce: the adapter updates (DP-SGD over users) and,
with ``popularity-prior``, the released item counts (the Gaussian mechanism), composed in one
accountant per silo. It does not cover the numbers a silo reports next to them, so those are
listed here with how each is limited (:func:`released_text`).
"""

from __future__ import annotations

from typing import Any


USER_LEVEL = (
    "**User-level (epsilon, delta)-differential privacy per silo.** Each silo trained with DP-SGD over "
    "its own users (Poisson sampling of users, per-user gradient clipping to `clip-norm`, Gaussian noise) "
    "and accounted every step of every round. For each silo, everything it released -- and hence this "
    "adapter -- is (epsilon, delta)-DP with respect to adding or removing one of its users together with "
    "all of that user's events, with the silo's epsilon and delta in the table below. The server and "
    "everyone who obtains this adapter are covered by that guarantee.")


def central_text(cfg: dict[str, Any], rounds: int) -> str:
    """The client-level guarantee of a ``central-dp = "fixed"`` run after ``rounds`` rounds."""
    from uirl.config import from_run_config
    from uirl.privacy.central import central_epsilon, central_noise

    config = from_run_config(cfg)
    fed = config.federation
    sigma = central_noise(config)
    eps = central_epsilon(noise_multiplier=sigma, sample_rate=fed.fraction_train, rounds=rounds,
                          delta=config.privacy.target_delta)
    return ("**Client-level (epsilon, delta)-differential privacy (central DP, `central-dp = \"fixed\"`).** "
            f"The server clipped each silo's update to L2 norm {fed.central_clip:g} and added Gaussian noise "
            f"(noise multiplier {sigma:.4g}) to their mean every round: after {rounds} rounds this adapter is "
            f"(epsilon = {eps:.4f}, delta = {config.privacy.target_delta:g})-DP with respect to adding or "
            "removing one whole silo (all of its users), by the RDP accountant with sample rate "
            f"`fraction-train` = {fed.fraction_train:g} (the amplification assumes every silo trains every "
            "round or Poisson sampling of silos). The silos must trust the server to add the noise: the "
            "server itself sees each silo's update in the clear.")


def distributed_text(shares: int) -> str:
    """The trust a distributed popularity release (``popularity-noise-shares`` > 1) adds."""
    return (f"**Distributed noise for the popularity release (`popularity-noise-shares = {shares}`).** Each silo "
            f"added only 1/sqrt({shares}) of the release's noise and sent its counts masked by SecAgg+, so the "
            "server saw only the sum of the silos' releases. The epsilon below counts the release at the noise of "
            f"that sum, which holds if at least {shares} silos' releases were in it, those silos added their noise "
            "as configured and kept it secret, and the server followed SecAgg+ (the server checks the count and "
            "stops the run with fewer). Against a coalition of the server and colluding silos that reveal their "
            "noise, the release of the remaining silos carries less noise than recorded.")


def guarantee_text(cfg: dict[str, Any], rounds: int) -> str:
    parts = []
    if cfg.get("dp", True):
        parts.append(USER_LEVEL)
        if cfg.get("popularity-prior", False) and int(cfg.get("popularity-noise-shares", 1)) > 1:
            parts.append(distributed_text(int(cfg["popularity-noise-shares"])))
    if cfg.get("central-dp", "") == "fixed":
        parts.append(central_text(cfg, rounds))
    if not parts:
        return ("**None.** This run trained without differential privacy (`dp = false`, no `central-dp`): the "
                "adapter may memorise individual users' behaviour. Do not publish it outside the silos.")
    return "\n\n".join(parts)


def released_text(cfg: dict[str, Any]) -> str:
    """Everything a silo sends the server in a run with run config ``cfg``, and what covers each."""
    dp = cfg.get("dp", True)
    lines = ["- the trainable adapter and head arrays (or their compressed delta): "
             + ("covered by the user-level guarantee;" if dp else "not private (`dp = false`);")]
    shares = int(cfg.get("popularity-noise-shares", 1))
    if cfg.get("popularity-prior", False) and shares > 1:
        lines.append(f"- once, its share of the item counts (each user's contribution bounded to L2 norm 1), masked by "
                     f"SecAgg+: discrete Gaussian noise of 1/sqrt({shares}) of the planned noise; the server sees only "
                     f"the sum of the silos' shares, whose noise each silo's accountant composes, provided at least "
                     f"{shares} honest silos' shares are in it;")
    elif cfg.get("popularity-prior", False):
        lines.append("- once, its item counts (each user's contribution bounded to L2 norm 1): "
                     + ("Gaussian noise, composed into the same accountant;" if dp else "exact (`dp = false`);"))
    lines.append("- its accountant's numbers (epsilon, delta, noise multiplier, sample rate, steps, rounds) "
                 "and its user count (the FedAvg weight): functions of the configuration and of the silo's "
                 "size, which DP-SGD's sample rate treats as public;")
    if dp:
        lines.append("- not its training loss or the size of its Poisson samples: under DP those stay on the "
                     "silo (its own console shows them);")
    else:
        lines.append("- its training loss and the number of users it sampled (exact: `dp = false`);")
    lines.append("- if its ClientApp fails, only the exception's class name (e.g. `ValueError (details in the silo's "
                 "log)`): the message and traceback, which may name local files and data, stay in the silo's log;")
    lines.append(f"- evaluation metrics (AUC, MRR, nDCG, Recall: exact averages over its test users, NOT covered "
                 f"by the guarantee), only from a silo that evaluated at least {cfg.get('eval-min-users', 10)} "
                 "users, so one user moves a reported average by at most 1/that number.")
    return "\n".join(lines)
