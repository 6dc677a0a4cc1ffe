"""Silos: IID, natural and Dirichlet partitionings, each silo loading only its own users, and a federated round."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import pandas as pd
import pytest

import publisher_files as pf
from helpers import tiny_config
from uirl.config import SiloConfig, from_run_config
from uirl.data.convert import ConvertOptions, convert
from uirl.data.fixed_split import read_split
from uirl.data.partition import assign
from uirl.data.silo import load_silo
from uirl.federated import STATUS_OK, _worker, local_evaluate, local_train
from uirl.model.build import build_model


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    convert("movielens", pf.write_ml100k_synthetic(root / "ml-100k"), root / "out", ConvertOptions(negatives=9))
    return root / "out"


USERS = pd.DataFrame({"user_id": [f"u{i:03d}" for i in range(90)],
                      "job": ["a", "b", "c"] * 30, "top_category": ["x"] * 60 + ["y"] * 20 + ["z"] * 10})


def test_iid_partitions_are_disjoint_cover_everyone_and_follow_the_seed():
    parts = assign(USERS, partitioning="iid", partition_by="", alpha=0.5, num_partitions=4, seed=1)
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(USERS["user_id"]) and len(set(flat)) == len(flat)
    assert [len(p) for p in parts] == [23, 23, 22, 22]
    assert parts == assign(USERS, partitioning="iid", partition_by="", alpha=0.5, num_partitions=4, seed=1)
    assert parts != assign(USERS, partitioning="iid", partition_by="", alpha=0.5, num_partitions=4, seed=2)
    assert parts[0] != sorted(USERS["user_id"])[:23]  # shuffled, not the first ids


def test_natural_partitions_follow_the_column_in_sorted_value_order():
    parts = assign(USERS, partitioning="natural", partition_by="job", alpha=0.5, num_partitions=3, seed=0)
    job = dict(zip(USERS["user_id"], USERS["job"]))
    assert [{job[u] for u in p} for p in parts] == [{"a"}, {"b"}, {"c"}]


def test_dirichlet_partitions_skew_the_label_mix_more_for_small_alpha():
    def skew(alpha):
        parts = assign(USERS, partitioning="dirichlet", partition_by="", alpha=alpha, num_partitions=3, seed=0)
        assert sorted(u for p in parts for u in p) == sorted(USERS["user_id"])
        top = dict(zip(USERS["user_id"], USERS["top_category"]))
        shares = [pd.Series([top[u] for u in p]).value_counts(normalize=True).reindex(["x", "y", "z"]).fillna(0)
                  for p in parts]
        return float(np.mean([np.abs(s.to_numpy() - np.array([60, 20, 10]) / 90).sum() for s in shares]))

    assert skew(0.1) > skew(100.0)


def test_iid_and_natural_assignments_equal_those_of_flwr_datasets():
    """Committed results were computed with flwr-datasets' IidPartitioner (on a Hugging Face
    ``Dataset`` shuffled with the seed) and NaturalIdPartitioner: ours give the same silos."""
    datasets = pytest.importorskip("datasets")
    partitioner = pytest.importorskip("flwr_datasets.partitioner")

    def theirs(p, n):  # as uirl's assign used them, quietly (a progress bar for natural ids)
        with contextlib.redirect_stderr(io.StringIO()):
            return [sorted(p.load_partition(i)["user_id"]) for i in range(n)]

    for size, seed in [(1, 0), (7, 3), (90, 1), (101, 2), (250, 42), (1001, 7)]:
        rng = np.random.default_rng(size)
        ids = [f"u{rng.integers(10**6)}-{i}" for i in range(size)]
        job = rng.choice(["b", "a", "c c", "Z", "é"], size).tolist()
        users = pd.DataFrame({"user_id": ids, "job": job})
        for n in {1, 2, 3, 4, 7, 10} & set(range(1, size + 1)):
            iid = partitioner.IidPartitioner(n)
            iid.dataset = datasets.Dataset.from_dict({"user_id": ids}).shuffle(seed=seed)
            ours = assign(users, partitioning="iid", partition_by="", alpha=0.5, num_partitions=n, seed=seed)
            assert ours == theirs(iid, n), (size, seed, n)
        natural = partitioner.NaturalIdPartitioner(partition_by="job")
        natural.dataset = datasets.Dataset.from_dict({"user_id": ids, "job": job})
        k = len(set(job))
        ours = assign(users, partitioning="natural", partition_by="job", alpha=0.5, num_partitions=k, seed=seed)
        assert ours == theirs(natural, k), (size, seed)


def test_dirichlet_is_deterministic_disjoint_complete_and_refuses_a_hopeless_setting():
    from uirl.errors import DataError

    def parts(seed, alpha=0.5, n=4, users=USERS):
        return assign(users, partitioning="dirichlet", partition_by="", alpha=alpha, num_partitions=n, seed=seed)

    for seed in range(5):
        first = parts(seed)
        assert first == parts(seed) and all(first) and all(p == sorted(p) for p in first)
        flat = [u for p in first for u in p]
        assert sorted(flat) == sorted(USERS["user_id"]) and len(set(flat)) == len(flat)
    assert len({str(parts(seed)) for seed in range(5)}) == 5
    with pytest.raises(DataError, match="num-partitions.*use fewer silos or a larger dirichlet-alpha"):
        parts(0, n=5, users=USERS.head(2))
    with pytest.raises(DataError, match="num-partitions.*left a silo empty"):
        parts(0, alpha=1e-3, n=30, users=USERS.head(40))


def test_each_silo_loads_only_its_own_users_with_the_fixed_lists(ml_dir):
    data = from_run_config({"dataset": str(ml_dir), "partitioning": "natural", "partition-by": "occupation"}).data
    silos = [load_silo(data, SiloConfig(partition_id=i, num_partitions=2), seed=0) for i in range(2)]
    occupation = pd.read_parquet(ml_dir / "user_attributes.parquet").set_index("user_id")["occupation"]
    everyone = {u.user_id: u for u in read_split(ml_dir / "split.parquet")}
    assert [{occupation[u.user_id] for u in s.users} for s in silos] == [{"engineer"}, {"writer"}]
    assert sum(len(s.users) for s in silos) == len(everyone)
    for silo in silos:
        assert set(silo.touched) == {u.user_id for u in silo.users}  # no other silo's events were loaded
        # the very lists written at conversion (the side data of the interest model comes on top)
        assert all(dataclasses.replace(u, behaviors=(), texts=(), text_pos=(), social_items=()) == everyone[u.user_id]
                   for u in silo.users)
        assert all(len(u.behaviors) == len(u.train_items) for u in silo.users)  # ratings as behaviour labels
        assert len(silo.item_text) == 300
    iid = from_run_config({"dataset": str(ml_dir)}).data  # auto: no silo column -> iid
    sizes = [len(load_silo(iid, SiloConfig(partition_id=i, num_partitions=3), seed=0).users) for i in range(3)]
    assert sizes == [20, 20, 20]


def test_synthetic_default_keeps_its_silos_and_can_be_repartitioned():
    silo_cfg = [SiloConfig(partition_id=i, num_partitions=2) for i in range(2)]
    base = {"synthetic-users": 60, "synthetic-items": 300}
    auto = [load_silo(from_run_config(base).data, s, seed=0) for s in silo_cfg]
    from uirl.data.silo import _synthetic, synthetic_spec

    events = _synthetic(synthetic_spec(from_run_config(base).data, num_silos=2, seed=0)).events
    for i, silo in enumerate(auto):
        assert {u.user_id for u in silo.users} <= set(events.loc[events["silo"] == str(i), "user_id"])
    iid = [load_silo(from_run_config({**base, "partitioning": "iid"}).data, s, seed=0) for s in silo_cfg]
    ids = [{u.user_id for u in s.users} for s in iid]
    assert not ids[0] & ids[1] and ids != [{u.user_id for u in s.users} for s in auto]


def test_federated_round_on_a_converted_dataset(ml_dir, tiny_bert):
    cfg = tiny_config(tiny_bert, **{"dataset": str(ml_dir), "partitioning": "natural", "partition-by": "occupation",
                                    "local-epochs": 1.0, "noise-multiplier": 1.0})  # no noise search: fast
    model, _ = build_model(cfg)
    state = {k: v.numpy().copy() for k, v in model.adapter_state().items()}
    for i in range(2):
        silo = SiloConfig(partition_id=i, num_partitions=2)
        arrays, metrics, ledger = local_train(cfg, silo, state, ledger_json=None, server_round=1)
        assert metrics["status"] == STATUS_OK and metrics["num-examples"] == 30 and metrics["epsilon"] > 0
        assert all(np.isfinite(v).all() for v in arrays.values())
        assert any(not np.array_equal(arrays[k], state[k]) for k in arrays)
        evaluated = local_evaluate(cfg, silo, arrays)
        assert 0.0 <= evaluated["auc"] <= 1.0 and evaluated["num-examples"] == 30
        assert len(_worker(cfg, silo)[1].users[0].test_candidates) == 10  # the converted lists (9 negatives)


def test_mind_candidate_lists_of_different_lengths_are_scored_per_user(tmp_path, tiny_bert):
    src = pf.write_mind(tmp_path / "MINDsmall_train")
    with open(src / "behaviors.tsv", "a", encoding="utf-8") as f:
        f.write("4\tU55555\t11/14/2019 7:00:00 AM\tN55528 N19639 N61837 N53526\tN2073-1 N49186-0\n")
    convert("mind", src, tmp_path / "mind", ConvertOptions(negatives=2))
    cfg = tiny_config(tiny_bert, **{"dataset": str(tmp_path / "mind"), "partitioning": "iid", "eval-min-users": 1})
    silo = SiloConfig(partition_id=0, num_partitions=1)
    users = {u.user_id: u for u in load_silo(cfg.data, silo, seed=0).users}
    assert len(users["U13740"].test_candidates) == 3 and len(users["U55555"].test_candidates) == 2
    assert users["U55555"].valid_target == "N53526"  # one eligible impression: validation falls back
    model, _ = build_model(cfg)
    state = {k: v.numpy().copy() for k, v in model.adapter_state().items()}
    metrics = local_evaluate(cfg, silo, state)
    assert metrics["num-examples"] == 2 and 0.0 <= metrics["auc"] <= 1.0


def test_a_deployed_silo_reads_every_user_of_its_own_data_path(ml_dir, tmp_path):
    from uirl.errors import ConfigError

    data = from_run_config({}).data  # the run's dataset is irrelevant once a node names its own
    silo = load_silo(data, SiloConfig(partition_id=1, num_partitions=3, data_path=str(ml_dir)), seed=0)
    assert {u.user_id for u in silo.users} == {u.user_id for u in read_split(ml_dir / "split.parquet")}
    with pytest.raises(ConfigError, match="data-path"):
        load_silo(data, SiloConfig(partition_id=0, num_partitions=3, data_path=str(tmp_path / "nowhere")), seed=0)
