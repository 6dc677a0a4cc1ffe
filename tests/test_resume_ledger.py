"""In-process checks of what makes a deployment restartable: the silo's durable ledger (replay,
refuse, fail closed), the server's checkpoints and resume bookkeeping, and the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import tiny_config
from uirl.checkpoint import CheckpointError, complete_rounds, load_checkpoint, resolve_resume, save_checkpoint
from uirl.config import SiloConfig, from_run_config, silo_from_node_config, to_run_config
from uirl.errors import ConfigError
from uirl.federated import STATUS_LEDGER_ERROR, STATUS_OK, STATUS_REPLAY_REFUSED, local_train_durable
from uirl.privacy import PrivacyError
from uirl.privacy.ledger_file import LedgerFile, Release, digest_arrays
from uirl.rundir import RunDirectory


def _global(cfg) -> dict[str, np.ndarray]:
    from uirl.model.build import build_model

    model, _ = build_model(cfg)
    return {k: v.numpy().copy() for k, v in model.adapter_state().items()}


@pytest.fixture(scope="module")
def setting(tiny_bert):
    cfg = tiny_config(tiny_bert, **{"num-server-rounds": 3})
    return cfg, _global(cfg)


def test_ledger_file_round_trip_and_fail_closed(tmp_path):
    file = LedgerFile(tmp_path / "ledger.json")
    assert file.read() is None  # a silo that never released anything
    ledger = ('{"accountant": "rdp", "history": [[1.0, 0.1, 5]], "noise_multiplier": 1.0, "rounds": 1, '
              '"sample_rate": 0.1, "target_delta": 1e-05, "target_epsilon": 8.0}')
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}
    release = Release(run="r", round=1, input_digest="x", update_digest=digest_arrays(arrays), metrics={"epsilon": 1.5})
    file.write(ledger, release, arrays)
    stored = file.read()
    assert stored.rounds == 1 and stored.release == release
    np.testing.assert_array_equal(file.released_arrays(stored.release)["b"], arrays["b"])
    released = file.release_path.read_bytes()
    file.release_path.write_bytes(released[: len(released) // 2])  # cut short: refused, not a traceback
    with pytest.raises(PrivacyError, match="unreadable released update"):
        file.released_arrays(stored.release)
    file.release_path.write_bytes(released)

    good = file.path.read_text()
    file.path.write_text(good.replace('"rounds": 1', '"rounds": 0'))  # edited: checksum no longer matches
    with pytest.raises(PrivacyError, match="corrupt"):
        file.read()
    file.path.write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(PrivacyError, match="corrupt"):
        file.read()
    file.path.unlink()  # deleted, but the released update next to it shows it existed
    with pytest.raises(PrivacyError, match="missing"):
        file.read()


def test_a_silo_replays_a_round_it_released_and_never_pays_twice(tmp_path, setting):
    cfg, state = setting
    silo = SiloConfig(partition_id=0, num_partitions=2, ledger_path=str(tmp_path / "silo" / "ledger.json"))
    arrays1, m1, _, err = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=1)
    assert err is None and m1["status"] == STATUS_OK and m1["rounds-trained"] == 1
    eps1 = m1["epsilon"]

    # The server crashed and asks for round 1 again with the same global model: the same update, no spend.
    again, m_again, _, err = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=1)
    assert err is None and m_again["replayed"] == 1.0 and m_again["epsilon"] == eps1
    assert set(m_again) == set(m1)  # the server averages replies only if their metric keys agree
    for name in arrays1:
        np.testing.assert_array_equal(again[name], arrays1[name])
    assert LedgerFile(silo.ledger_path).read().rounds == 1

    # ... with another global model: refused, nothing spent, nothing released.
    other = {k: v + 0.01 for k, v in state.items()}
    none, m_other, _, err = local_train_durable(cfg, silo, other, ledger_json=None, run="r", server_round=1)
    assert none is None and m_other["status"] == STATUS_REPLAY_REFUSED and "refusing" in err
    assert LedgerFile(silo.ledger_path).read().rounds == 1

    # The next round spends; a restarted node (no node state) continues from the file.
    _, m2, _, err = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=2)
    assert err is None and m2["rounds-trained"] == 2 and m2["epsilon"] > eps1

    # The server says this silo trained 3 rounds, its ledger shows 2: the ledger was lost -> refuse.
    none, m3, _, err = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=3,
                                           expected_rounds=3)
    assert none is None and m3["status"] == STATUS_LEDGER_ERROR and "lost" in err

    # A damaged ledger file: refuse to train, and leave the file as it is.
    path = tmp_path / "silo" / "ledger.json"
    path.write_text(path.read_text()[:-20])
    damaged = path.read_text()
    none, m4, _, err = local_train_durable(cfg, silo, state, ledger_json=None, run="r", server_round=3)
    assert none is None and m4["status"] == STATUS_LEDGER_ERROR and "corrupt" in err
    assert path.read_text() == damaged


def test_a_silo_spends_from_its_ledger_file_only_while_holding_its_lock(tmp_path, setting):
    """Another process of the same silo holds the ledger lock (a round of another run, say): this
    round waits, then reads the ledger as the other one left it, so both spends are recorded."""
    import threading

    cfg, state = setting
    path = tmp_path / "silo" / "ledger.json"
    silo = SiloConfig(partition_id=0, num_partitions=2, ledger_path=str(path))
    first, _, _, err = local_train_durable(cfg, silo, state, ledger_json=None, run="a", server_round=1)
    assert err is None
    out = {}
    with LedgerFile(path).locked():
        worker = threading.Thread(target=lambda: out.update(reply=local_train_durable(
            cfg, silo, state, ledger_json=None, run="b", server_round=1)))
        worker.start()
        worker.join(timeout=3)
        assert worker.is_alive()  # waiting for the lock, nothing read or spent yet
        assert LedgerFile(path).read().rounds == 1
    worker.join(timeout=120)
    assert not worker.is_alive()
    arrays, metrics, _, err = out["reply"]
    assert err is None and metrics["rounds-trained"] == 2 and LedgerFile(path).read().rounds == 2


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path, setting):
    cfg, state = setting
    run = RunDirectory.create(tmp_path / "runs", "a", {})
    writes = []

    def write_adapter(directory):
        directory.mkdir(parents=True)
        (directory / "adapter_config.json").write_text("{}")
        writes.append(directory)

    for r in (1, 2, 3):
        run.record_round({"round": r, "auc": 0.5 + r / 100})
        run.record_privacy(r, "0", {"epsilon": float(r), "rounds-trained": r})
        save_checkpoint(run.path, r, {k: v + r for k, v in state.items()}, strategy={"name": "X"},
                        rounds=run.rounds, ledger=run.ledger, write_adapter=write_adapter, keep=2)
    assert complete_rounds(run.path) == [2, 3]
    # A crash while writing round 4 leaves a hidden temporary directory: it never counts.
    (run.path / "checkpoints" / ".round-4.abc.tmp").mkdir()
    ckpt = load_checkpoint(run.path)
    assert ckpt.round == 3 and ckpt.ledger["0"]["epsilon"] == 3.0
    for name, value in state.items():
        np.testing.assert_array_equal(ckpt.arrays[name], value + 3)
    # A damaged newest checkpoint falls back to the one before.
    arrays = run.path / "checkpoints" / "round-3" / "arrays.safetensors"
    good = arrays.read_bytes()
    arrays.write_bytes(good[: len(good) // 2])
    assert load_checkpoint(run.path).round == 2
    arrays.write_bytes(good)
    (run.path / "checkpoints" / "round-3" / "state.json").write_text("{")
    assert load_checkpoint(run.path).round == 2
    assert resolve_resume(tmp_path / "runs", "latest") == run.path
    with pytest.raises(CheckpointError):
        resolve_resume(tmp_path / "runs", str(tmp_path / "nope"))

    # Resuming from round 2 forgets what round 3 wrote, everywhere.
    ckpt = load_checkpoint(run.path)
    again = RunDirectory.reopen(run.path, upto_round=ckpt.round, rounds=ckpt.rounds, ledger=ckpt.ledger)
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2] and len(again.rounds) == 2
    privacy = [json.loads(x)["round"] for x in (run.path / "privacy.jsonl").read_text().splitlines()]
    assert privacy == [1, 2]
    assert json.loads((run.path / "privacy_ledger.json").read_text())["0"]["rounds-trained"] == 2


def test_resume_keys_and_data_path_are_validated():
    assert from_run_config({"resume": "latest", "checkpoint-keep": 3}).federation.checkpoint_keep == 3
    with pytest.raises(ConfigError, match="checkpoint-keep"):
        from_run_config({"checkpoint-keep": 0})
    silo = silo_from_node_config({"partition-id": 1, "num-partitions": 3, "data-path": "/silo/data",
                                  "ledger-path": "/silo/ledger.json", "target-epsilon": 2.0})
    assert silo.data_path == "/silo/data" and silo.ledger_path == "/silo/ledger.json" and silo.target_epsilon == 2.0


def test_export_loads_with_peft_and_scores_like_the_trained_model(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModel

    from uirl.cli import main
    from uirl.data.silo import load_silo
    from uirl.export import load_exported
    from uirl.model import TextBank
    from uirl.model.build import build_model, save_adapter
    from uirl.train import evaluate

    cfg = tiny_config(tiny_bert)
    model, encoder = build_model(cfg)
    with torch.no_grad():  # a "trained" adapter: move every trainable array away from its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    run = RunDirectory.create(tmp_path / "runs", "x", {})
    run.record_round({"round": 0, "auc": 0.5})
    run.record_round({"round": 1, "auc": 0.6})
    run.record_privacy(1, "0", {"epsilon": 1.25, "delta": 1e-5, "target-epsilon": 8.0, "rounds-trained": 1})
    save_adapter(model, run.path / "final", meta={"base-model": tiny_bert, "run-config": to_run_config(cfg)})

    assert main(["export", str(run.path), str(tmp_path / "out")]) == 0
    assert main(["export", str(run.path), str(tmp_path / "out")]) == 2  # never overwrites
    assert main(["export", str(tmp_path / "runs"), str(tmp_path / "out2")]) == 2  # not a finished run
    card = (tmp_path / "out" / "README.md").read_text()
    assert "1.2500" in card and "User-level" in card and tiny_bert in card

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(tmp_path / "out"))
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())
    exported, tokenizer = load_exported(tmp_path / "out")
    silo = load_silo(cfg.data, SiloConfig(partition_id=0, num_partitions=2), seed=cfg.train.seed)
    model.eval()
    ours = evaluate(model, TextBank(silo.item_text, encoder.tokenizer, cfg.model.max_tokens), silo.eval_users,
                    cfg, split="test")
    theirs = evaluate(exported, TextBank(silo.item_text, tokenizer, cfg.model.max_tokens), silo.eval_users,
                      cfg, split="test")
    for key in ("auc", "mrr", "ndcg@10"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-9)
