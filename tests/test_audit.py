"""The membership-inference audit: its metrics, and that it sees a leak where there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_config
from uirl.baselines import load_silos
from uirl.model import TextBank
from uirl.model.build import build_model
from uirl.privacy.audit import membership_audit, roc_auc, tpr_at_fpr
from uirl.train import train_round


def test_attack_metrics_on_known_scores():
    members, nonmembers = np.arange(10, 20, dtype=float), np.arange(0, 10, dtype=float)
    assert roc_auc(members, nonmembers) == 1.0
    assert roc_auc(nonmembers, members) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5  # ties count half
    # 1000 non-members: 1% FPR lets the threshold pass the 10 highest of them.
    nonmembers = np.arange(1000, dtype=float)
    members = np.array([995.5, 989.5, 985.0, 500.0])
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.5  # 995.5 and 989.5 beat the 11th highest (989)
    assert tpr_at_fpr(members, nonmembers, 0.001) == 0.0  # may pass only the highest (999): threshold 998
    assert tpr_at_fpr(np.array([998.5, 0.0]), nonmembers, 0.001) == 0.5
    assert tpr_at_fpr(np.array([2000.0]), nonmembers, 0.001) == 1.0


def _audit(model, init, state, banks, silos, cfg):
    return membership_audit(state, init, model, banks, silos, max_history=cfg.data.max_history,
                            num_negatives=cfg.data.train_negatives, seed=0)


def test_audit_finds_an_overfit_model_and_not_an_untrained_one(tiny_bert):
    torch.manual_seed(0)
    cfg = tiny_config(tiny_bert, **{"holdout-users": 0.5, "dp": False, "lr": 0.05, "ffa-lora": False,
                                    "synthetic-users": 80, "batch-users": 40, "lora-r": 8})
    silos = load_silos(cfg, 1)
    silo = silos[0]
    assert silo.users and silo.heldout and not {u.user_id for u in silo.users} & {u.user_id for u in silo.heldout}
    model, encoder = build_model(cfg)
    init = {n: t.clone().numpy() for n, t in model.adapter_state().items()}
    banks = {0: TextBank(silo.item_text, encoder.tokenizer, cfg.model.max_tokens)}

    untrained = _audit(model, init, init, banks, silos, cfg)
    assert abs(untrained["mia-loss-auc"] - 0.5) < 0.15, untrained
    assert untrained["mia-calibrated-auc"] == 0.5  # target == reference: no signal at all

    for step in range(80):  # full-batch steps on few users at a high learning rate: memorisation
        train_round(model, banks[0], silo.users, silo.touched, cfg, ledger=None, example_seed=step)
    state = {n: t.clone().numpy() for n, t in model.adapter_state().items()}
    overfit = _audit(model, init, state, banks, silos, cfg)
    assert overfit["mia-loss-auc"] > 0.7, overfit
    assert overfit["mia-calibrated-auc"] > 0.6, overfit
    assert overfit["members"] == len(silo.users) and overfit["nonmembers"] == len(silo.heldout)


def test_holdout_is_seeded_and_leaves_the_default_split_alone(tiny_bert):
    plain = load_silos(tiny_config(tiny_bert), 2)
    held = load_silos(tiny_config(tiny_bert, **{"holdout-users": 0.3}), 2)
    again = load_silos(tiny_config(tiny_bert, **{"holdout-users": 0.3}), 2)
    for p, h, a in zip(plain, held, again):
        assert p.heldout == () and h.heldout == a.heldout and h.heldout
        assert sorted(u.user_id for u in h.users + h.heldout) == sorted(u.user_id for u in p.users)
        assert set(h.eval_users) <= set(h.users)


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_holdout_fraction_is_validated(tiny_bert, bad):
    from uirl.errors import ConfigError

    with pytest.raises(ConfigError, match="holdout-users"):
        tiny_config(tiny_bert, **{"holdout-users": bad})
