"""``uirl embed`` / ``uirl recommend`` on a tiny trained model: outputs, formats, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import tiny_config
from uirl.cli import main
from uirl.config import SiloConfig, to_run_config
from uirl.data.silo import load_silo
from uirl.federated import local_train
from uirl.model.build import build_model, load_trained, save_adapter
from uirl.train import score_users

PARTS = {"levels": "short,long", "facets": 2, "views": "behavior,text", "vae": True, "num-server-rounds": 1,
         "synthetic-users": 24, "synthetic-items": 120}


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A run's final/ directory after one round of DP training on silo 0 of 2."""
    cfg = tiny_config(tiny_bert, **PARTS)
    model, encoder = build_model(cfg)
    state = {k: v.numpy().copy() for k, v in model.adapter_state().items()}
    arrays, _, _ = local_train(cfg, SiloConfig(partition_id=0, num_partitions=2), state, ledger_json=None,
                               server_round=1)
    model.load_adapter_state({k: torch.from_numpy(v) for k, v in arrays.items()})
    final = tmp_path_factory.mktemp("run") / "final"
    save_adapter(model, final, meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)})
    return final, cfg, model


def test_saved_model_loads_back_exactly(trained):
    final, _, model = trained
    loaded, _, cfg = load_trained(final)
    assert cfg.interest.facets == 2 and cfg.interest.vae
    for name, value in model.adapter_state().items():
        torch.testing.assert_close(loaded.adapter_state()[name], value, rtol=0, atol=0, msg=name)


def test_embed_writes_every_users_vectors_as_npz_and_parquet(trained, tmp_path):
    final, cfg, _ = trained
    assert main(["embed", str(final), "--out", str(tmp_path / "u.npz"), "--num-silos", "2"]) == 0
    z = np.load(tmp_path / "u.npz")
    users = [u.user_id for k in (0, 1) for u in load_silo(cfg.data, SiloConfig(k, 2), seed=0).users]
    assert z["user_id"].tolist() == users
    n, d = len(users), z["interest"].shape[1]
    assert z["facets"].shape == (n, 2, d) and z["level_short"].shape == z["level_long"].shape == (n, d)
    assert z["view_text_present"].dtype == bool and z["view_text_present"].any()
    np.testing.assert_allclose(np.linalg.norm(z["interest"], axis=1), 1.0, rtol=1e-5)
    assert np.abs(z["view_text"][~z["view_text_present"]]).sum() == 0  # a missing view is zero, flagged
    assert main(["embed", str(final), "--out", str(tmp_path / "u.parquet"), "--num-silos", "2", "--silo", "1"]) == 0
    table = pq.read_table(tmp_path / "u.parquet").to_pydict()
    one = [u.user_id for u in load_silo(cfg.data, SiloConfig(1, 2), seed=0).users]
    assert table["user_id"] == one
    np.testing.assert_allclose(np.array(table["facets"]), z["facets"][-len(one):], rtol=1e-6)


def test_recommend_ranks_the_test_candidates_like_evaluation(trained, tmp_path):
    final, cfg, model = trained
    out = tmp_path / "r.jsonl"
    assert main(["recommend", str(final), "--out", str(out), "--num-silos", "2", "--silo", "0",
                 "--candidates", "test", "-k", "3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    silo = load_silo(cfg.data, SiloConfig(0, 2), seed=0)
    from uirl.federated import silo_bank

    loaded, encoder, _ = load_trained(final)
    scores = score_users(loaded, silo_bank(silo, encoder.tokenizer, cfg), silo.users, split="test",
                         max_history=cfg.data.max_history)
    for line, user, s in zip(lines, silo.users, scores):
        assert line["user_id"] == user.user_id and len(line["items"]) == 3
        assert line["items"] == [user.test_candidates[i] for i in np.argsort(-s, kind="stable")[:3]]
        assert line["scores"] == sorted(line["scores"], reverse=True)


def test_recommend_from_the_catalogue_skips_what_the_user_touched(trained, tmp_path):
    final, cfg, _ = trained
    out = tmp_path / "r.csv"
    assert main(["recommend", str(final), "--out", str(out), "--num-silos", "2", "-k", "5"]) == 0
    rows = list(csv.DictReader(out.open()))
    touched = {}
    for k in (0, 1):
        touched.update(load_silo(cfg.data, SiloConfig(k, 2), seed=0).touched)
    by_user: dict[str, list[dict]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row)
    assert len(by_user) == sum(len(load_silo(cfg.data, SiloConfig(k, 2), seed=0).users) for k in (0, 1)) and all(len(r) == 5 for r in by_user.values())
    for user, recs in by_user.items():
        assert [int(r["rank"]) for r in recs] == [1, 2, 3, 4, 5]
        assert not {r["item_id"] for r in recs} & touched[user]
        assert [float(r["score"]) for r in recs] == sorted((float(r["score"]) for r in recs), reverse=True)


def test_bad_input_is_one_line_exit_2_and_leaves_outputs_alone(trained, tmp_path, capsys):
    final, _, _ = trained
    out = tmp_path / "keep.csv"
    out.write_text("old\n")
    assert main(["recommend", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "not a saved uirl model" in capsys.readouterr().err
    assert out.read_text() == "old\n"
    assert main(["embed", str(final), "--out", str(tmp_path / "u.txt")]) == 2
    assert main(["embed", str(final), "--out", str(tmp_path / "u.npz"), "--num-silos", "2", "--silo", "5"]) == 2
    err = capsys.readouterr().err
    assert "expected a .npz or .parquet" in err and "--silo 5" in err
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_model_trained_with_the_prior_recommends_with_it(tiny_bert, tmp_path):
    """The prior is part of the model: saved next to it, exported with it, and scored by
    ``recommend`` (the item with the largest prior tops every list when its weight dominates), and a
    model that needs it does not load without it."""
    from uirl.export import export_run
    from uirl.federated import catalogue_ids
    from uirl.model.build import PRIOR_FILE, load_prior

    cfg = tiny_config(tiny_bert, **{"popularity-prior": True, "synthetic-users": 24, "synthetic-items": 120})
    model, encoder = build_model(cfg)
    with torch.no_grad():
        model.prior_weight.weight.fill_(1000.0)
    silo = load_silo(cfg.data, SiloConfig(0, 1), seed=0)
    ids = catalogue_ids(silo)
    prior = np.zeros(len(ids), dtype=np.float32)
    star = next(i for i in ids if all(i not in silo.touched[u.user_id] for u in silo.users))
    prior[ids.index(star)] = 5.0
    final = tmp_path / "run" / "final"
    save_adapter(model, final, meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)}, prior=prior)
    np.testing.assert_array_equal(load_prior(final, cfg), prior)
    out = tmp_path / "r.jsonl"
    assert main(["recommend", str(final), "--out", str(out), "--num-silos", "1", "-k", "2"]) == 0
    assert all(json.loads(line)["items"][0] == star for line in out.read_text().splitlines())
    assert (export_run(tmp_path / "run", tmp_path / "export") / PRIOR_FILE).is_file()
    (final / PRIOR_FILE).unlink()
    assert main(["recommend", str(final), "--out", str(out), "--num-silos", "1"]) == 2


def test_a_local_prior_model_recommends_with_each_silos_own_counts(tiny_bert, tmp_path):
    """With ``local-prior`` the released sum is saved with the model, exported with it, and
    ``recommend`` ranks a silo's users with that silo's own exact counts plus the other silos'
    part: here the others' part puts one untouched item first, and the silo's own counts order
    the rest; a model that needs the sum does not load without it."""
    from uirl.export import export_run
    from uirl.federated import catalogue_ids, own_counts, _worker
    from uirl.model.build import RELEASE_FILE

    cfg = tiny_config(tiny_bert, **{"popularity-prior": True, "local-prior": True, "synthetic-users": 24,
                                    "synthetic-items": 120})
    model, encoder = build_model(cfg)
    with torch.no_grad():
        model.prior_weight.weight.fill_(1000.0)
    silo = load_silo(cfg.data, SiloConfig(0, 1), seed=0)
    ids = catalogue_ids(silo)
    own = own_counts(cfg, _worker(cfg, SiloConfig(0, 1))[1])
    star = next(i for i in ids if all(i not in silo.touched[u.user_id] for u in silo.users))
    others = np.zeros(len(ids))
    others[ids.index(star)] = 100.0
    final = tmp_path / "run" / "final"
    save_adapter(model, final, meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)},
                 prior=np.zeros(len(ids), dtype=np.float32), release=(own + others, 0.0))
    out = tmp_path / "r.jsonl"
    assert main(["recommend", str(final), "--out", str(out), "--num-silos", "1", "-k", "2"]) == 0
    own_of = dict(zip(ids, own))
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        untouched = [i for i in ids if i not in silo.touched[rec["user_id"]] and i != star]
        assert rec["items"][0] == star
        assert own_of[rec["items"][1]] == max(own_of[i] for i in untouched)
    assert (export_run(tmp_path / "run", tmp_path / "export") / RELEASE_FILE).is_file()
    (final / RELEASE_FILE).unlink()
    assert main(["recommend", str(final), "--out", str(out), "--num-silos", "1"]) == 2


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uirl: ") and "Traceback" not in err, err
    return lines[0]


def test_a_truncated_adapter_is_one_line_naming_the_file(trained, tmp_path, capsys):
    """An adapter cut to half its bytes (an interrupted copy): embed and recommend say which file is
    damaged, exit 2, and leave the existing outputs as they were."""
    import shutil

    final = tmp_path / "final"
    shutil.copytree(trained[0], final)
    adapter = final / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    out = tmp_path / "keep.csv"
    out.write_text("old\n")
    for command in ("embed", "recommend"):
        target = out if command == "recommend" else tmp_path / "u.npz"
        assert main([command, str(final), "--out", str(target), "--num-silos", "2"]) == 2
        line = _one_line_error(capsys)
        assert str(adapter) in line and "not a readable safetensors file" in line and "cut short" in line
    assert out.read_text() == "old\n" and not (tmp_path / "u.npz").exists()
    assert not list(tmp_path.glob(".*"))


def test_a_model_from_another_base_model_names_the_array_and_both_shapes(trained, tmp_path, capsys):
    """The base model given (or named by the run config) is not the one the adapter was trained on:
    one line with the array, its shape and the expected one, not torch's size-mismatch traceback."""
    import shutil

    from transformers import BertConfig, BertModel

    final, cfg, _ = trained
    other = tmp_path / "wider-bert"
    shutil.copytree(cfg.model.name, other)  # same tokenizer, hidden size 48 instead of 32
    BertModel(BertConfig(vocab_size=BertConfig.from_pretrained(cfg.model.name).vocab_size, hidden_size=48,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         max_position_embeddings=64)).save_pretrained(str(other))
    assert main(["embed", str(final), "--out", str(tmp_path / "u.npz"), "--model-name", str(other)]) == 2
    line = _one_line_error(capsys)
    assert "adapter_model.safetensors: array 'base_model.model." in line and "lora_" in line
    assert "has shape (4, 32)" in line and "expects (4, 48)" in line
    assert "trained on another base model or config" in line and str(other) in line
    assert not (tmp_path / "u.npz").exists()
