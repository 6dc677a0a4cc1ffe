"""Accounting for user-level DP-SGD on one silo: a small, serialisable privacy ledger.

The ledger stores exactly what an Opacus accountant needs -- its history of
``(noise_multiplier, sample_rate, steps)`` -- plus the silo's target budget, so epsilon can be
recomputed by anyone from the JSON, persists across rounds (node state in simulation, checkpoints)
and never restarts at zero the way a fresh ``PrivacyEngine`` per round would.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from uirl.errors import UirlError


#: RDP orders searched when converting to (epsilon, delta): Opacus's defaults (1.1 .. 63) plus
#: larger orders. With few steps or little noise (large target epsilon) the optimum lies above 63
#: and the defaults report a looser epsilon than the mechanism has; more orders never loosen it.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                      + list(range(64, 256, 8)) + [256, 384, 512, 768, 1024])


def _epsilon_kwargs(accountant: str) -> dict:
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


class PrivacyError(UirlError):
    """A privacy guarantee would be broken (budget exhausted, corrupt ledger, wrong per-user shape)."""


def plan_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                          steps: int, accountant: str = "rdp") -> float:
    """Smallest noise multiplier (to Opacus's 0.01 epsilon tolerance) such that ``steps`` Poisson-
    sampled Gaussian steps at ``sample_rate`` stay within (target_epsilon, target_delta)."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant,
                                          epsilon_tolerance=0.01, **_epsilon_kwargs(accountant)))
    except ValueError as exc:
        raise PrivacyError(f"cannot reach epsilon={target_epsilon} at delta={target_delta} with "
                           f"sample rate {sample_rate:.4g} over {steps} steps: {exc}") from None


@dataclass
class PrivacyLedger:
    """What one silo has spent. ``history`` is Opacus's accountant history, as lists."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    target_epsilon: float
    target_delta: float
    history: list[list[float]] = field(default_factory=list)
    rounds: int = 0  # rounds this silo has trained in
    popularity_released: bool = False  # the silo's one popularity release is in ``history``

    def __post_init__(self) -> None:
        if self.accountant not in ("rdp", "prv"):
            raise PrivacyError(f"ledger: unknown accountant {self.accountant!r}")
        for entry in self.history:
            if len(entry) != 3 or not all(math.isfinite(float(x)) for x in entry) or entry[2] < 0:
                raise PrivacyError(f"ledger: malformed history entry {entry!r}")
        if not (0 < self.sample_rate <= 1) or self.noise_multiplier < 0:
            raise PrivacyError(f"ledger: sample rate {self.sample_rate} / noise {self.noise_multiplier} out of range")

    @property
    def steps(self) -> int:
        return int(sum(entry[2] for entry in self.history))

    def _accountant(self, extra_steps: int = 0):
        acc = create_accountant(mechanism=self.accountant)
        acc.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        for _ in range(extra_steps):
            acc.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return acc

    def epsilon(self) -> float:
        """Epsilon spent so far at ``target_delta`` (0 before any step)."""
        return self.epsilon_after(0)

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon if ``extra_steps`` more steps were taken (the budget check before a round)."""
        acc = self._accountant(extra_steps)
        if not acc.history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(acc.get_epsilon(delta=self.target_delta, **_epsilon_kwargs(self.accountant)))

    def can_afford(self, steps: int) -> bool:
        return self.epsilon_after(steps) <= self.target_epsilon

    def record(self, steps: int) -> None:
        """Add ``steps`` steps at this ledger's (noise, sample rate). Call once per step taken,
        or once per round with that round's number of steps (identical result)."""
        acc = self._accountant(steps)
        self.history = [[float(s), float(q), int(n)] for s, q, n in acc.history]

    def record_release(self, noise_multiplier: float) -> None:
        """Add the popularity release: one Gaussian mechanism of L2 sensitivity 1 (= one step at
        sample rate 1 with this noise multiplier; see :mod:`uirl.privacy.popularity`). Once per run."""
        if self.popularity_released:
            raise PrivacyError("the popularity counts of this silo were already released in this run")
        if not noise_multiplier > 0:
            raise PrivacyError(f"popularity release noise multiplier {noise_multiplier} must be > 0")
        self.history = [[float(noise_multiplier), 1.0, 1]] + [list(e) for e in self.history]
        self.popularity_released = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "ledger") -> "PrivacyLedger":
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise PrivacyError(f"{source}: corrupt privacy ledger ({exc}); refusing to train") from None
