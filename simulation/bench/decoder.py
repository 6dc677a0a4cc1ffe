"""A ``lora`` training step with a 0.5B-1B decoder LLM as the encoder: time, model FLOPs, MFU.

The decoder is built from its published shape with random weights (timing does not depend on the
weights) and a word-level tokenizer over the synthetic data's words, written to a temporary folder
and loaded the way a user's local model is (``model-name`` = that folder). The step is the
project's own (:func:`simulation.bench.steps.make_step`: non-private and user-level DP, the same
fixed batch), on the run config's ``device``.

**Model FLOPs** of a step: the encoder's forward over the token positions it really processes (each
length bucket cut to its own longest text, as :meth:`uirl.model.InterestModel.encode_in_buckets`
does), times 2: the backward computes the gradients with respect to the activations (as many FLOPs
as the forward) but none for the frozen weights; the LoRA adapters, Opacus's per-user gradients and
the interest model are left out (under 1% at these sizes). Per position and layer the forward costs
``2 x`` the numbers of the query, key, value, output and the three MLP matrices, plus ``4 x hidden x
width`` for attention scores and their weighted sum over a call of ``width`` positions (the full
square, as in PaLM's accounting). Model FLOP utilisation (MFU) is model FLOPs per second over the
device's peak for the arithmetic the step uses: float32 (TF32 tensor cores when torch allows them
for matmuls), with the bfloat16 peak beside it for reference.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from uirl.config import Config

#: Published shapes (Qwen2-0.5B's and Llama-3.2-1B's config.json), and a tiny one for smoke tests.
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2-0.5b": ("qwen2", {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                             "num_key_value_heads": 2, "intermediate_size": 4864}),
    "llama-1b": ("llama", {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                           "num_key_value_heads": 8, "intermediate_size": 8192}),
    "tiny": ("llama", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "intermediate_size": 128}),
}

#: Dense peak TFLOP/s per GPU from NVIDIA's datasheets (the sparse figures halved), by the
#: arithmetic in use: plain float32, TF32 tensor cores, bfloat16 tensor cores.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def save_random_decoder(path: str | Path, shape: str, *, seed: int = 0) -> str:
    """Write a decoder of ``shape`` (:data:`SHAPES`) with random weights and a word-level tokenizer."""
    from transformers import AutoConfig, AutoModel, BertTokenizerFast

    from simulation.tiny_encoder import word_vocabulary

    if shape not in SHAPES:
        raise ValueError(f"decoder shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    model_type, dims = SHAPES[shape]
    vocab = word_vocabulary()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    config = AutoConfig.for_model(model_type, vocab_size=len(vocab), pad_token_id=0, max_position_embeddings=512,
                                  **dims)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def forward_flops_per_position(config, width: int) -> float:
    """Forward FLOPs of one token position in a call of ``width`` positions (see the module doc)."""
    h, layers, mlp = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    projections = 2 * (h * h + 2 * h * kv + h * h)  # query, key, value, output
    feed_forward = 2 * 3 * h * mlp  # gate, up, down
    attention = 4 * h * width  # scores and their weighted sum
    return float(layers * (projections + feed_forward + attention))


def step_flops(config, calls: list[tuple[int, int]]) -> float:
    """Model FLOPs of one training step whose encoder runs ``calls`` of (rows, width)."""
    return 2.0 * sum(rows * width * forward_flops_per_position(config, width) for rows, width in calls)


def datasheet_peaks(device_name: str) -> dict[str, float] | None:
    """The :data:`PEAK_TFLOPS` entry of a GPU named ``device_name`` (as CUDA names it), or None."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in device_name for part in key.split()):
            return PEAK_TFLOPS[key]
    return None


def peak_tflops(device: torch.device) -> tuple[str | None, dict[str, float] | None]:
    """The device's name and its datasheet peaks (None for a CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, datasheet_peaks(name)


def step_calls(cfg: Config, *, users: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The token length of each text of the step's fixed batch (:func:`simulation.bench.steps.fixed_batch`)
    and the (rows, width) of each encoder call the step makes: the rows sorted by length and cut
    into ``length-buckets`` calls, each as wide as its longest row."""
    from simulation.bench.padding import row_buckets
    from simulation.bench.steps import fixed_batch, model_and_bank

    _, bank, silo = model_and_bank(cfg)
    batch = bank.make_batch(fixed_batch(cfg, silo, bank, users), tokens=False)
    lengths = [len(bank.token_ids(k)) for k in batch.row_keys]
    buckets = row_buckets(lengths, min(cfg.model.length_buckets, len(lengths)))
    return lengths, [(len(rows), max(lengths[i] for i in rows)) for rows in buckets if rows]


def decoder_section(cfg: Config, *, users: int, repeats: int, peak: float | None = None) -> dict:
    """Seconds, model FLOPs, TFLOP/s and MFU of the non-private and DP ``lora`` steps of ``cfg``
    (whose ``model-name`` is a decoder from :func:`save_random_decoder`), interleaved."""
    from transformers import AutoConfig

    from simulation.bench.measure import interleaved, spread
    from simulation.bench.steps import make_step
    from uirl.train import resolve_device

    device = resolve_device(cfg.train.device)
    config = AutoConfig.from_pretrained(cfg.model.name)
    lengths, calls = step_calls(cfg, users=users)
    flops = step_flops(config, calls)

    steps = {kind: make_step(cfg, users=users, kind=kind) for kind in ("non-private", "dp")}

    def timed(step):
        def take() -> float:
            loss = step.take()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return loss
        return take

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = interleaved({kind: timed(step) for kind, step in steps.items()}, repeats=repeats)
    finally:
        for step in steps.values():
            step.close()
    name, peaks = peak_tflops(device)
    arithmetic = "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"
    peak_used = peak if peak is not None else (peaks or {}).get(arithmetic)
    out = {"decoder": {"model-type": config.model_type, "hidden": config.hidden_size,
                       "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                       "kv-heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
                       "matrix-parameters": layer_matrix_parameters(cfg.model.name)},
           "device": str(device), "device-name": name, "arithmetic": arithmetic,
           "users": steps["dp"].users, "texts": len(lengths), "real-tokens": sum(lengths),
           "calls": [{"rows": r, "width": w} for r, w in calls], "positions": sum(r * w for r, w in calls),
           "model-flops-per-step": flops, "repeats": repeats, "torch-threads": torch.get_num_threads(),
           "peak-tflops": peak_used, "peak-tflops-source": "--peak-tflops" if peak is not None else
           (f"datasheet, {arithmetic}" if peak_used else None),
           "peak-tflops-bf16": (peaks or {}).get("bf16"),
           "seconds": {kind: spread(t) for kind, t in times.items()}, "tflops": {}, "mfu": {}, "mfu-vs-bf16-peak": {}}
    for kind, t in times.items():
        achieved = flops / statistics.median(t) / 1e12
        out["tflops"][kind] = achieved
        out["mfu"][kind] = achieved / peak_used if peak_used else None
        out["mfu-vs-bf16-peak"][kind] = achieved / out["peak-tflops-bf16"] if out["peak-tflops-bf16"] else None
    out["ratio"] = {"dp/non-private": statistics.median(times["dp"]) / statistics.median(times["non-private"])}
    if device.type == "cuda":
        out["peak-gpu-memory-gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def layer_matrix_parameters(path: str | Path) -> int:
    """Numbers in the saved decoder's weight matrices inside its layers (read from the safetensors
    headers): what :func:`forward_flops_per_position` counts twice per position."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if (key.startswith("layers.") or ".layers." in key) and key.endswith(".weight") and len(shape) == 2:
                    total += int(shape[0]) * int(shape[1])
    return total
