"""The thread count of a process that trains silos (run config ``torch-threads``)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from uirl.config import ConfigError, SiloConfig, from_run_config
from uirl.federated import local_evaluate
from uirl.threads import apply_threads, automatic_threads, usable_cores


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_automatic_share_is_omp_num_threads_else_the_usable_cores():
    assert automatic_threads({"OMP_NUM_THREADS": "3"}) == 3
    for unset in ({}, {"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "two"}):
        assert automatic_threads(unset) == usable_cores() >= 1


def test_automatic_only_lowers_and_an_explicit_count_is_set(restore_threads, monkeypatch):
    torch.set_num_threads(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # e.g. a Ray actor given one CPU
    assert apply_threads(0) == 1 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert apply_threads(0) == 1 == torch.get_num_threads()  # a count a script chose itself is kept
    assert apply_threads(3) == 3 == torch.get_num_threads()


def test_a_silo_runs_at_the_configured_count(tiny_bert, restore_threads):
    torch.set_num_threads(2)
    cfg = tiny_config(tiny_bert, **{"torch-threads": 1})
    local_evaluate(cfg, SiloConfig(partition_id=0, num_partitions=2), _initial(cfg))
    assert torch.get_num_threads() == 1


def _initial(cfg):
    from uirl.model.build import build_model

    model, _ = build_model(cfg)
    return {k: v.numpy().copy() for k, v in model.adapter_state().items()}


def test_a_negative_count_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="torch-threads"):
        from_run_config({"torch-threads": -1})

