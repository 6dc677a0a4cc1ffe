"""Empirical privacy audit: membership inference on users.

Members are the users a model was trained on; non-members are users of the same silos that were
held out of training (``holdout-users``), so both come from the same distribution. The attacker
sees the model and a user's data and guesses whether the user was in training:

- **loss** attack (Yeom et al., 2018): score = minus the user's mean next-item loss;
- **calibrated** attack (reference-model / offline LiRA-style, Watson et al. 2022; Carlini et al.
  2022): score = the reference model's loss on that user minus the target model's, which removes
  how hard the user is anyway. The reference is a model trained on none of the audited users
  (here the pretrained model the run started from).

A user's loss is the mean softmax cross-entropy over every position t of their training sequence
(history = the items before t, candidates = item t + fixed negatives the user never touched): the
same loss the training loop minimises, on fixed examples. Results: ROC AUC, and TPR at 1% and
0.1% FPR (resolution limited to 1 / number of non-members). DP bounds them: an (eps, delta)-DP
training run allows at most TPR <= e^eps * FPR + delta for any attack.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uirl.data import UserData
from uirl.data.split import _negatives
from uirl.model import InterestModel, TextBank
from uirl.train import encode_items

_STREAM = 3  # negatives for the audit: a stream of their own (1, 2 are validation and test)


def _examples(user: UserData, *, max_history: int, num_negatives: int, pool: Sequence[str],
              touched: frozenset, seed: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    rng = np.random.default_rng([seed, zlib.crc32(user.user_id.encode("utf-8")), _STREAM])
    train = user.train_items
    exclude = set(touched) | set(train) | {user.valid_target, user.test_target}
    return [(train[max(0, t - max_history):t], (train[t],) + _negatives(pool, exclude, num_negatives, rng,
                                                                         user.user_id))
            for t in range(1, len(train))]


@torch.no_grad()
def user_losses(model: InterestModel, bank: TextBank, users: Sequence[UserData],
                touched: dict[str, frozenset], *, max_history: int, num_negatives: int, seed: int
                ) -> np.ndarray:
    """(U,) mean loss of each user over fixed examples from their training sequence (NaN if too short)."""
    model.eval()
    pool = bank.item_ids
    examples = [_examples(u, max_history=max_history, num_negatives=num_negatives, pool=pool,
                          touched=touched.get(u.user_id, frozenset()), seed=seed) for u in users]
    needed = {i for ex in examples for h, c in ex for i in (*h, *c)}
    vectors = encode_items(model, bank, sorted(needed))
    out = np.full(len(users), np.nan)
    for k, ex in enumerate(examples):
        if not ex:
            continue
        losses = []
        for history, candidates in ex:
            hist = torch.stack([vectors[i] for i in history]).unsqueeze(0)
            mask = torch.ones(hist.shape[:2], dtype=torch.bool, device=hist.device)
            cand = torch.stack([vectors[i] for i in candidates]).unsqueeze(0)
            logits = model.score(model.user_vectors(hist, mask), cand)
            losses.append(float(F.cross_entropy(logits, torch.zeros(1, dtype=torch.long, device=hist.device))))
        out[k] = float(np.mean(losses))
    return out


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting half."""
    m, n = np.asarray(members, float)[:, None], np.asarray(nonmembers, float)[None, :]
    return float(np.mean((m > n) + 0.5 * (m == n)))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """Highest fraction of members flagged by a threshold that flags at most ``fpr`` of non-members."""
    members, nonmembers = np.asarray(members, float), np.sort(np.asarray(nonmembers, float))[::-1]
    allowed = int(np.floor(fpr * len(nonmembers)))  # non-members the threshold may flag
    # Flag scores strictly above the (allowed+1)-th highest non-member score.
    threshold = nonmembers[allowed] if allowed < len(nonmembers) else -np.inf
    return float(np.mean(members > threshold))


def attack_metrics(members: np.ndarray, nonmembers: np.ndarray, prefix: str) -> dict[str, float]:
    """``{prefix}-auc``, ``{prefix}-tpr@1%``, ``{prefix}-tpr@0.1%`` for scores where higher = member."""
    members, nonmembers = members[np.isfinite(members)], nonmembers[np.isfinite(nonmembers)]
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("the audit needs at least one member and one non-member with a training sequence")
    return {f"{prefix}-auc": roc_auc(members, nonmembers),
            f"{prefix}-tpr@1%": tpr_at_fpr(members, nonmembers, 0.01),
            f"{prefix}-tpr@0.1%": tpr_at_fpr(members, nonmembers, 0.001)}


def membership_audit(target: dict[str, np.ndarray], reference: dict[str, np.ndarray], model: InterestModel,
                     banks: dict[int, TextBank], silos: Sequence, *, max_history: int, num_negatives: int,
                     seed: int) -> dict[str, float]:
    """Loss and calibrated attacks on ``target`` (adapter state), calibrated by ``reference``.

    ``silos``: objects with ``silo_id``, ``users`` (members), ``heldout`` (non-members), ``touched``.
    """
    scores: dict[str, list[np.ndarray]] = {"member": [], "nonmember": [], "ref-member": [], "ref-nonmember": []}
    for state, prefix in ((target, ""), (reference, "ref-")):
        model.load_adapter_state({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        for silo in silos:
            for group, users in (("member", silo.users), ("nonmember", silo.heldout)):
                scores[prefix + group].append(user_losses(model, banks[silo.silo_id], users, silo.touched,
                                                          max_history=max_history, num_negatives=num_negatives,
                                                          seed=seed))
    loss = {k: np.concatenate(v) if v else np.zeros(0) for k, v in scores.items()}
    out = {"members": float(np.isfinite(loss["member"]).sum()),
           "nonmembers": float(np.isfinite(loss["nonmember"]).sum())}
    out.update(attack_metrics(-loss["member"], -loss["nonmember"], "mia-loss"))
    out.update(attack_metrics(loss["ref-member"] - loss["member"], loss["ref-nonmember"] - loss["nonmember"],
                              "mia-calibrated"))
    # The loss attack on the reference, which saw no audited user: how far from 0.5 chance alone
    # (this member/non-member split) puts the loss attack's AUC.
    out["mia-loss-auc-reference"] = roc_auc(-loss["ref-member"][np.isfinite(loss["ref-member"])],
                                            -loss["ref-nonmember"][np.isfinite(loss["ref-nonmember"])])
    return out
