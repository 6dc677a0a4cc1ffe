"""What a silo does in a round (no Flower runtime): what leaves it, its budget, its learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_config
from uirl.config import SiloConfig
from uirl.federated import (EVAL_METRICS, STATUS_BUDGET_EXHAUSTED, STATUS_OK, TRAIN_METRICS, _worker,
                            local_evaluate, local_train)
from uirl.model.build import build_model
from uirl.train import TrainingError, _check_update

SILO = SiloConfig(partition_id=0, num_partitions=2)


def _global(cfg):
    worker, _ = _worker(cfg, SILO)
    model, _ = build_model(cfg)  # a fresh model: what a server would send in round 1
    return {k: v.numpy().copy() for k, v in model.adapter_state().items()}, worker


def test_reply_carries_only_trainable_arrays_and_whitelisted_scalars(tiny_bert):
    cfg = tiny_config(tiny_bert)
    state, worker = _global(cfg)
    arrays, metrics, ledger = local_train(cfg, SILO, state, ledger_json=None, server_round=1)
    trainable = {n for n, p in worker.model.named_parameters() if p.requires_grad}
    assert set(arrays) == trainable
    assert all("lora_B" in n or not n.startswith("encoder.") for n in arrays)  # FFA-LoRA: no A, no base
    assert set(metrics) <= TRAIN_METRICS
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["status"] == STATUS_OK and 0 < metrics["epsilon"] <= cfg.privacy.target_epsilon
    # Every array moved (it trained) and stayed finite.
    for name, value in arrays.items():
        assert np.isfinite(value).all()
        assert not np.array_equal(value, state[name]), name
    sent = sum(v.nbytes for v in arrays.values())
    full = sum(p.numel() * p.element_size() for p in worker.model.parameters())
    assert sent < 0.35 * full  # tiny model: heads are relatively large; see the MiniLM test below
    evaluated = local_evaluate(cfg, SILO, state)
    assert set(evaluated) <= EVAL_METRICS and 0.0 <= evaluated["auc"] <= 1.0


@pytest.mark.parametrize("dp", [True, False])
def test_a_silo_reports_its_progress_within_a_round_on_its_own_console(tiny_bert, dp):
    """``progress-every=0``: a line per step with the users so far and, under DP, the epsilon spent,
    then one with the round's loss; the last line's epsilon is the one the reply reports. The lines
    go to ``say`` (the silo's own console); under DP the loss and the sample size never enter the reply."""
    cfg = tiny_config(tiny_bert, dp=dp, **{"progress-every": 0})
    state, _ = _global(cfg)
    lines: list[str] = []
    _, metrics, _ = local_train(cfg, SILO, state, ledger_json=None, server_round=1, say=lines.append)
    steps = int(metrics["steps"])
    assert [line.split(":")[1].strip() for line in lines] == ["silo 0 round 1"] * (steps + 1)
    users = int(lines[-2].split(", ")[1].split()[0])
    assert lines[-2].startswith(f"uirl: silo 0 round 1: step {steps}/{steps}, {users} users")
    assert lines[-1].startswith(f"uirl: silo 0 round 1: trained, {steps} steps, {users} users, loss ")
    assert lines[-1].endswith(f"epsilon {metrics['epsilon']:.2f}") if dp else "epsilon" not in lines[-1]
    assert ("train-loss" in metrics and "users-sampled" in metrics) is not dp
    if not dp:
        assert metrics["users-sampled"] == users and lines[-1].split("loss ")[1] == f"{metrics['train-loss']:.4f}"
    quiet: list[str] = []  # the default: a line every 15 s, so only the last one in a round this short
    local_train(tiny_config(tiny_bert, dp=dp), SILO, state, ledger_json=None, server_round=1, say=quiet.append)
    assert len(quiet) == 1 and ": trained, " in quiet[0]


def test_a_silo_with_too_few_evaluated_users_reports_no_metrics(tiny_bert):
    """Evaluation metrics are not DP: a silo reports them only as averages over at least
    eval-min-users users, and a configuration that would evaluate fewer is refused up front."""
    from uirl.errors import ConfigError
    from uirl.federated import EvaluationWithheld

    cfg = tiny_config(tiny_bert, **{"eval-min-users": 1000})
    state, _ = _global(cfg)
    with pytest.raises(EvaluationWithheld, match="fewer than eval-min-users 1000"):
        local_evaluate(cfg, SILO, state)
    with pytest.raises(ConfigError, match="eval-max-users"):
        tiny_config(tiny_bert, **{"eval-max-users": 3})  # below the default eval-min-users (10)


def test_minilm_reply_is_about_one_percent_of_the_model():
    from uirl.config import from_run_config

    model, _ = build_model(from_run_config({}))
    sent = sum(v.numel() * v.element_size() for v in model.trainable_state().values())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sent / full < 0.02, (sent, full)


def test_silo_refuses_to_train_once_the_next_round_would_exceed_its_budget(tiny_bert):
    cfg = tiny_config(tiny_bert, **{"num-server-rounds": 2, "target-epsilon": 3.0})
    state, _ = _global(cfg)
    ledger = None
    epsilons = []
    for server_round in (1, 2):
        arrays, metrics, ledger = local_train(cfg, SILO, state, ledger_json=ledger, server_round=server_round)
        assert arrays is not None and metrics["status"] == STATUS_OK
        epsilons.append(metrics["epsilon"])
    assert epsilons[0] < epsilons[1] <= 3.0
    arrays, metrics, ledger_after = local_train(cfg, SILO, state, ledger_json=ledger, server_round=3)
    assert arrays is None and metrics["status"] == STATUS_BUDGET_EXHAUSTED
    assert metrics["epsilon"] == pytest.approx(epsilons[1])  # nothing was spent
    assert ledger_after == ledger


def test_update_guard_catches_non_finite_and_silently_unchanged_adapters():
    p = torch.nn.Parameter(torch.ones(3))
    before = [p.detach().clone()]
    p.grad = torch.ones(3)
    with pytest.raises(TrainingError, match="unchanged"):
        _check_update(before, [p])
    with torch.no_grad():
        p[0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        _check_update(before, [p])


@pytest.mark.parametrize("dp", [False, True])
def test_training_raises_test_auc_above_chance_and_round_zero(tiny_bert, dp, monkeypatch):
    # The DP noise and user sampling come from the OS entropy pool in real runs; here they are
    # seeded so that the pass mark measures learning, not one draw of the noise.
    monkeypatch.setattr("uirl.privacy.dp_sgd.secure_generator",
                        lambda device="cpu": torch.Generator(device=device).manual_seed(1234))
    monkeypatch.setattr("uirl.train.secure_sampling_rng", lambda: np.random.default_rng(1234))
    overrides = {"dp": dp, "num-server-rounds": 6, "lr": 0.01, "local-epochs": 2.0, "batch-users": 16,
                 "target-epsilon": 50.0}
    cfg = tiny_config(tiny_bert, **overrides)
    state, _ = _global(cfg)
    before = local_evaluate(cfg, SILO, state)["auc"]
    ledger = None
    for server_round in range(1, 7):
        arrays, metrics, ledger = local_train(cfg, SILO, state, ledger_json=ledger, server_round=server_round)
        state.update(arrays)
    after = local_evaluate(cfg, SILO, state)["auc"]
    assert after > 0.6 and after > before + 0.05, (before, after)


def test_silos_sharing_a_process_share_one_model_and_never_each_others_training(tiny_bert, monkeypatch):
    """A process builds one model however many silos it hosts; a silo's update is the same whether
    or not other silos trained on that model before it (every message reloads all trainable arrays)."""
    import uirl.federated as federated

    cfg = tiny_config(tiny_bert, dp=False)
    silos = [SiloConfig(partition_id=k, num_partitions=6) for k in range(6)]
    state, _ = _global(cfg)

    def fresh_process() -> None:
        federated._model.cache_clear()
        federated._CATALOGUES.clear()

    fresh_process()
    builds = []
    build = federated.build_model
    monkeypatch.setattr(federated, "build_model", lambda c: builds.append(c) or build(c))
    alone, _, _ = local_train(cfg, silos[5], state, ledger_json=None, server_round=1)
    fresh_process()
    for silo in silos:
        arrays, metrics, _ = local_train(cfg, silo, state, ledger_json=None, server_round=1)
        assert metrics["status"] == STATUS_OK
        local_evaluate(cfg, silo, state)
    assert len(builds) == 2  # one per fresh process, not one per silo
    assert set(arrays) == set(alone)
    for name in alone:
        np.testing.assert_array_equal(arrays[name], alone[name], err_msg=name)
