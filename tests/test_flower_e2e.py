"""One real `flwr run .` through ``uirl run``'s launcher: local SuperLink, 3 simulated silos, tiny
model, 2 rounds."""

from __future__ import annotations

import io
import json

from uirl.launch.output import ConciseLog
from uirl.launch.simulation import run_simulation


def _run_config(tmp_path, model_path, extra: str = "") -> str:
    return (f"model-name='{model_path}' num-server-rounds=2 synthetic-users=90 synthetic-items=300 "
            f"max-history=4 eval-negatives=9 batch-users=8 lora-r=4 max-tokens=16 "
            f"run-dir='{tmp_path / 'runs'}' run-name='e2e' progress-every=0 {extra}")


def _run(tmp_path, model_path, extra: str = ""):
    log = io.StringIO()
    result = run_simulation(supernodes=3, run_config=_run_config(tmp_path, model_path, extra), cpus_per_client=1,
                            flwr_home=tmp_path / "flwr-home", log=ConciseLog(log))
    return result, log.getvalue()


def test_flwr_run_completes_and_writes_the_run_directory(tmp_path, tiny_bert):
    result, shown = _run(tmp_path, tiny_bert)
    assert result.status == "finished:completed", result.text[-3000:]
    run = tmp_path / "runs" / "e2e"
    assert result.run_dir == run  # named by the ServerApp in its run-info file, not parsed from output
    log = (run / "flower.log").read_text()
    assert "uirl: run directory" in log and "\x1b[" not in log  # the full log, without colour codes
    assert "default simulated SuperNodes changed" in log and "default simulated SuperNodes" not in shown
    assert "round=2" in shown and "\x1b[" not in shown
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    assert (rows[2]["silos-trained"], rows[2]["silos-replied"], rows[2]["silos-rejected"]) == (3, 3, 0)
    assert "silos=3/3" in shown
    # Each silo's progress within a round (progress-every=0: every step), without Ray's actor prefix.
    assert any(line.startswith("uirl: silo 0 round 1: step 1/") and "epsilon" in line for line in shown.splitlines())
    ledger = json.loads((run / "privacy_ledger.json").read_text())  # keyed by Flower's node ids
    assert sorted(entry["silo"] for entry in ledger.values()) == [0, 1, 2] and "0" not in ledger
    for silo in ledger.values():
        assert silo["rounds-trained"] == 2 and 0 < silo["epsilon"] <= silo["target-epsilon"]
    assert rows[2]["epsilon/silo-0"] > rows[1]["epsilon/silo-0"]  # the accountant persisted
    assert (run / "metrics.csv").read_text().startswith("round,")
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()

    # The exported adapter loads with PEFT's own loader onto the base model.
    from peft import PeftModel
    from transformers import AutoModel

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(final))
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())


def test_a_failing_server_app_is_reported_as_failed(tmp_path, tiny_bert):
    # A run config the ServerApp rejects (lr must be > 0): `flwr run --stream` itself exits 0.
    result, _ = _run(tmp_path, tiny_bert, extra="lr=-1.0")
    status, text = result.status, result.text
    assert status.startswith("finished:") and status != "finished:completed", (status, text[-2000:])
    assert "lr" in text and result.run_dir is None


def test_a_run_in_which_no_silo_can_train_fails_and_writes_no_final_adapter(tmp_path, tiny_bert, monkeypatch, capsys):
    """Every silo's budget is too small for one round, so each refuses (fail closed): round 1 has
    no valid update. ``uirl run`` must say the run failed and exit non-zero; nothing final is written."""
    from uirl.cli import main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    run_config = _run_config(tmp_path, tiny_bert, "target-epsilon=0.01 noise-multiplier=0.5")
    code = main(["run", "--supernodes", "2", "--run-config", run_config])
    out = capsys.readouterr().out
    assert code == 1 and "flower run status: finished:failed" in out, out[-3000:]
    assert "round 1: 0 valid update(s) from 2 silo(s) asked" in out  # the reason, on the console
    run = tmp_path / "runs" / "e2e"
    assert not (run / "final").exists() and not (run / "checkpoints").exists()
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    refusals = [json.loads(line) for line in (run / "privacy.jsonl").read_text().splitlines()]
    assert len(refusals) == 2 and all(r["status"] == 1 and r["accepted"] is False for r in refusals)
    assert "RunFailed" in (run / "flower.log").read_text()
