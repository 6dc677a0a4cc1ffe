"""``python -m simulation.bench --quick``: the benchmark runs offline with the tiny model and writes
the numbers it claims (each step's median, min and max from its own repeats, the DP/non-private
ratio from the two medians, one process per scaling cell with its own peak memory)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_writes_consistent_numbers(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "simulation.bench", "--quick", "--only", "step,scaling",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    result = json.loads(text)
    assert "uirl-bench-" not in text  # the temporary tiny model is named, not its path

    machine = result["machine"]
    for key in ("cpu-model", "cores", "torch", "flwr", "torch-threads", "load-average-before", "load-average-after"):
        assert machine[key] not in (None, ""), key
    assert len(machine["load-average-before"]) == 3 and machine["flwr"].startswith("1.")
    assert set(result["sections"]) == {"step", "scaling"}

    step = result["sections"]["step"]
    assert step["users"] == 16 and step["texts"] > step["users"]
    for kind in ("non-private", "dp", "dp-per-text", "cached-non-private", "cached-dp"):
        sec = step["seconds"][kind]
        assert len(sec["all"]) == sec["n"] == step["repeats"] == 3
        assert all(_positive(v) for v in sec["all"])
        assert sec["min"] <= sec["median"] <= sec["max"]
        assert math.isclose(sec["median"], statistics.median(sec["all"]), rel_tol=1e-12)
        assert math.isclose(step["users-per-second"][kind], step["users"] / sec["median"], rel_tol=1e-9)
    ratio = step["ratio"]["dp/non-private"]
    assert _positive(ratio)
    assert math.isclose(ratio, step["seconds"]["dp"]["median"] / step["seconds"]["non-private"]["median"],
                        rel_tol=1e-9)
    assert result["targets"][0]["measured"] == ratio and result["targets"][0]["met"] == (ratio <= 1.10)
    assert all(t["met"] is None for t in result["targets"][1:])  # no 100-silo cell in a quick run

    scaling = result["sections"]["scaling"]
    assert [c["silos"] for c in scaling["cells"]] == [3, 10]
    for cell in scaling["cells"]:
        assert not cell["timed-out"] and cell["exit-code"] == 0
        assert cell["users"] == 30 * cell["silos"] and cell["rounds-done"] == cell["rounds"] == 1
        for key in ("wall-seconds", "engine-seconds", "round-0-seconds", "seconds-per-round", "peak-rss-mib"):
            assert _positive(cell[key]), key
        assert cell["engine-seconds"] < cell["wall-seconds"]


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    """Linux hands a parent's high-water mark to its children across fork/exec (``ru_maxrss``); a
    benchmark that starts its cells from a process holding models must still see each cell's own."""
    from simulation.bench.measure import run_child

    held = bytearray(600 * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # resident, not just reserved
    child = run_child(["-c", "import time; x = bytearray(100 * 2**20); x[::4096] = b'x' * len(x[::4096]); "
                             "time.sleep(0.5)"])
    assert child.returncode == 0
    assert 100 <= child.peak_rss_mib < 400, child.peak_rss_mib
    del held


def test_padding_counts_by_hand():
    from simulation.bench.padding import padding_counts

    # rows of 2 and 5 tokens (user 0), 3 and 8 (user 1)
    out = padding_counts([2, 5, 3, 8], [0, 0, 1, 1], ks=(2,))
    assert (out["real-tokens"], out["one-call-positions"]) == (18, 32)  # 4 rows x 8
    assert out["one-call-padding-share"] == pytest.approx(14 / 32)
    assert out["layouts"]["per-row-2"]["positions"] == 2 * 3 + 2 * 8  # {2, 3} and {5, 8}
    assert out["layouts"]["per-user-2"]["positions"] == 2 * 5 + 2 * 8  # user 0 and user 1
    assert out["layouts"]["per-row-2"]["positions/one-call"] == pytest.approx(22 / 32)


def test_decoder_model_flops_count_each_layer_matrix_twice_per_position_plus_attention(tmp_path):
    """The FLOP count of the decoder section: 2 x the layers' matrices per position (counted from
    the saved model's own Linear layers and, for Qwen2-0.5B's shape, against its published 0.36B
    non-embedding parameters), 4 x hidden x width for attention, and a step twice the forward."""
    from torch import nn
    from transformers import AutoConfig, AutoModel

    from simulation.bench.decoder import (SHAPES, datasheet_peaks, forward_flops_per_position,
                                          layer_matrix_parameters, save_random_decoder, step_flops)

    path = save_random_decoder(tmp_path / "tiny-decoder", "tiny")
    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linear == layer_matrix_parameters(path) == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128)
    width = 9
    attention = config.num_hidden_layers * 4 * config.hidden_size * width
    assert forward_flops_per_position(config, width) == 2 * linear + attention
    assert step_flops(config, [(3, 5), (2, 7)]) == 2 * (15 * forward_flops_per_position(config, 5)
                                                        + 14 * forward_flops_per_position(config, 7))
    qwen = AutoConfig.for_model(SHAPES["qwen2-0.5b"][0], **SHAPES["qwen2-0.5b"][1])
    per_layer = 896 * 896 * 2 + 2 * 896 * 128 + 3 * 896 * 4864
    assert forward_flops_per_position(qwen, 0) == 2 * 24 * per_layer
    assert round(24 * per_layer / 1e9, 2) == 0.36  # Qwen2-0.5B: 0.36B non-embedding parameters
    assert datasheet_peaks("NVIDIA H100 80GB HBM3")["bf16"] == 989.4
    assert datasheet_peaks("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert datasheet_peaks("NVIDIA H200")["fp32"] == 67.0
    assert datasheet_peaks("Tesla T4") is None


def test_quick_decoder_section_reports_flops_per_second_and_mfu_from_its_own_medians(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "simulation.bench", "--quick", "--only", "decoder",
                           "--peak-tflops", "0.5", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "uirl-bench-" not in text  # the temporary decoder is named, not its path
    dec = json.loads(text)["sections"]["decoder"]
    assert dec["shape"] == "tiny" and dec["device"] == "cpu" and dec["arithmetic"] == "fp32"
    assert dec["positions"] == sum(c["rows"] * c["width"] for c in dec["calls"]) >= dec["real-tokens"]
    assert sum(c["rows"] for c in dec["calls"]) == dec["texts"]
    for kind in ("non-private", "dp"):
        tflops = dec["model-flops-per-step"] / dec["seconds"][kind]["median"] / 1e12
        assert math.isclose(dec["tflops"][kind], tflops, rel_tol=1e-9)
        assert math.isclose(dec["mfu"][kind], tflops / 0.5, rel_tol=1e-9)
        assert dec["mfu-vs-bf16-peak"][kind] is None  # no datasheet for a CPU
    assert dec["peak-tflops-source"] == "--peak-tflops"


def test_the_decoder_sections_calls_are_the_encoder_calls_a_step_makes(tmp_path):
    """The positions the FLOP count uses are those the encoder really sees in a DP step: every
    call of the decoder's token embedding during one step, as (rows, width)."""
    import torch
    from torch import nn

    from simulation.bench.decoder import save_random_decoder, step_calls
    from simulation.bench.steps import make_step
    from uirl.config import from_run_config

    path = save_random_decoder(tmp_path / "tiny-decoder", "tiny")
    vocab = len((Path(path) / "vocab.txt").read_text(encoding="utf-8").splitlines())
    for buckets in (1, 3):
        cfg = from_run_config({"device": "cpu", "train-mode": "lora", "model-name": path, "synthetic-users": 90,
                               "synthetic-items": 300, "length-buckets": buckets})
        _, calls = step_calls(cfg, users=6)
        step = make_step(cfg, users=6, kind="dp")
        seen = []

        def note(module, args):
            if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
                seen.append(tuple(args[0].shape))

        handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
        try:
            step.take()
        finally:
            handle.remove()
            step.close()
        assert len(calls) == buckets
        assert sorted(seen) == sorted(calls)


@pytest.mark.parametrize("args, said", [
    (["--decoder", "tiny"], "apply to the decoder section"),
    (["--only", "decoder", "--peak-tflops", "-1"], "--peak-tflops must be a number > 0"),
    (["--only", "decoder", "--decoder", "big"], "--decoder must be one of qwen2-0.5b, llama-1b, tiny"),
])
def test_decoder_options_are_refused_with_a_reason_before_any_work(args, said, capsys):
    from simulation.bench.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and said in capsys.readouterr().err
