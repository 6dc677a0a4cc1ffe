"""How much of a ``lora`` step's encoder work is padding, and what length bucketing would save.

A ``lora`` step runs every text row of the batch through the encoder in one call, right-padded to
the longest row. This section counts token positions on the step section's fixed batch (no
timing): that one call, and the same rows split into ``k`` calls two ways:

- **per-user micro-batches**: users sorted by their longest row, split into ``k`` groups, each group
  one forward and backward. Every user stays in one call, so Opacus's per-row gradients regroup to
  users exactly as now;
- **per-row buckets**: rows sorted by length, split into ``k`` calls. A user's rows then lie in
  several calls of the same layers, and Opacus 1.6 adds the per-sample gradients of a layer's
  repeated calls into the same leading rows (``create_or_accumulate_grad_sample``), so the rows of
  different calls -- different users -- would be mixed: this layout needs one backward per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uirl.config import Config


def positions(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> int:
    """Token positions of encoding the rows of each group (indices into ``lengths``) in one call."""
    return int(sum(len(g) * max(lengths[i] for i in g) for g in groups if len(g)))


def row_buckets(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Rows sorted by length and cut into ``k`` near-equal calls."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [list(map(int, c)) for c in np.array_split(order, k)]


def user_groups(lengths: Sequence[int], owner: Sequence[int], k: int) -> list[list[int]]:
    """Users sorted by their longest row and cut into ``k`` near-equal groups; a group's rows in one call."""
    rows: dict[int, list[int]] = {}
    for i, u in enumerate(owner):
        rows.setdefault(int(u), []).append(i)
    users = sorted(rows, key=lambda u: (max(lengths[i] for i in rows[u]), u))
    return [[i for u in chunk for i in rows[int(u)]] for chunk in np.array_split(np.array(users), k)]


def padding_counts(lengths: Sequence[int], owner: Sequence[int], ks: Sequence[int] = (2, 4, 8)) -> dict:
    """Real tokens, padded positions of one call, and each layout's positions and padding share."""
    lengths = [int(x) for x in lengths]
    real, one = sum(lengths), positions(lengths, [range(len(lengths))])
    out = {"rows": len(lengths), "real-tokens": real, "one-call-positions": one,
           "one-call-padding-share": 1 - real / one, "layouts": {}}
    for k in ks:
        for name, groups in (("per-user", user_groups(lengths, owner, k)), ("per-row", row_buckets(lengths, k))):
            p = positions(lengths, groups)
            out["layouts"][f"{name}-{k}"] = {"calls": k, "positions": p, "padding-share": 1 - real / p,
                                             "positions/one-call": p / one}
    return out


def padding_section(cfg: Config, *, users: int) -> dict:
    """:func:`padding_counts` of the step section's fixed ``lora`` batch (``users`` users of silo 0)."""
    from simulation.bench.steps import fixed_batch, model_and_bank

    _, bank, silo = model_and_bank(cfg)
    batch = bank.make_batch(fixed_batch(cfg, silo, bank, users), tokens=False)
    lengths = [len(bank.token_ids(k)) for k in batch.row_keys]
    return {"model": cfg.model.name, "users": users, "max-tokens": cfg.model.max_tokens,
            **padding_counts(lengths, batch.row_user.tolist())}
