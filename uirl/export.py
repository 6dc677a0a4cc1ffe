"""Export a finished run: the final adapter (PEFT format + interest head) and a model card.

``export_run(run_dir, out)`` copies ``run_dir/final`` (``adapter_config.json``,
``adapter_model.safetensors``, ``interest_head.safetensors``, ``uirl_model.json``) to ``out`` and
writes ``README.md``: base model, data, each silo's (epsilon, delta) and what they guarantee,
rounds, final metrics. ``out`` is assembled in a temporary directory and renamed into place, so
it is either complete or absent. :func:`load_exported` rebuilds the interest model from such a
directory (the same loader as ``uirl embed``: :func:`uirl.model.build.load_trained`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from uirl.atomic import atomic_dir
from uirl.errors import DataError, UirlError
from uirl.privacy.guarantee import guarantee_text, released_text
from uirl.rundir import PRIOR_FILE, RELEASE_FILE, read_json_object, read_jsonl, read_ledger, read_release
from uirl.tensor_files import check_tensor_file

FILES = ("adapter_config.json", "adapter_model.safetensors", "interest_head.safetensors", "uirl_model.json")
#: Files a model has only with some settings: the popularity prior with ``popularity-prior``, the
#: released sum it was built from with ``local-prior``.
OPTIONAL_FILES = (PRIOR_FILE, RELEASE_FILE)
_METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10", "recall@5", "recall@10")


def model_card(run_dir: Path, meta: dict[str, Any]) -> str:
    """The README.md of an export, from the run directory's files."""
    cfg = meta.get("run-config", {})
    rounds = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    ledger_path = run_dir / "privacy_ledger.json"
    ledger = read_ledger(ledger_path) if ledger_path.is_file() else {}
    last = rounds[-1] if rounds else {}
    try:
        adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        base = meta.get("base-model", cfg.get("model-name", "?"))
    trained = max((int(r["round"]) for r in rounds), default=0)
    lines = [
        f"# uirl user-interest adapter ({run_dir.name})", "",
        "A LoRA adapter and interest head for a pretrained text encoder, trained with federated learning "
        "across data silos that never shared their users' data. Load it with",
        "", "```python",
        "from uirl.export import load_exported",
        "model, tokenizer = load_exported(\"<this directory>\")",
        "```", "",
        "or the adapter alone with `PeftModel.from_pretrained(AutoModel.from_pretrained(base), \"<this directory>\")`.",
        "", "## Base model", "",
        f"- encoder: `{base}` (frozen), pooling `{meta.get('pooling')}`"
        + (f"; offline, the pip package `{meta['base-model-package']}` ships these weights (uirl's loaders "
           "use it when it is installed)" if meta.get("base-model-package") else ""),
        f"- LoRA rank {cfg.get('lora-r')}, alpha {cfg.get('lora-alpha')}, targets `{cfg.get('lora-targets')}`, "
        f"FFA-LoRA (A frozen): {cfg.get('ffa-lora')}; score = cosine / {meta.get('temperature')}",
        "", "## Data", "",
        f"- dataset: `{cfg.get('dataset')}`"
        + (f" ({cfg.get('synthetic-users')} users, {cfg.get('synthetic-items')} items)"
           if cfg.get("dataset") == "synthetic" else ""),
        f"- silos: {len(ledger) or '?'}; per user: last positive = test target, history of up to "
        f"{cfg.get('max-history')} earlier events; {cfg.get('eval-negatives')} sampled negatives per test target",
        "", "## Privacy", "", guarantee_text(cfg, trained), "",
    ]
    if cfg.get("dp", True):
        lines += ["| silo | epsilon | delta | target epsilon | noise multiplier | sample rate | rounds trained |",
                  "|---|---|---|---|---|---|---|"]
    for node, e in sorted(ledger.items(), key=lambda kv: (str(kv[1].get("silo", "")), kv[0])) \
            if cfg.get("dp", True) else ():
        eps, silo = e.get("epsilon"), e.get("silo", f"node {node}")  # ledger rows are keyed by node id
        lines.append(f"| {silo} | {eps:.4f} | {e.get('delta')} | {e.get('target-epsilon')} | "
                     f"{e.get('noise-multiplier', 0):.4f} | {e.get('sample-rate', 0):.4f} | "
                     f"{int(e.get('rounds-trained') or 0)} |" if isinstance(eps, (int, float)) else
                     f"| {silo} | - | - | - | - | - | - |")
    lines += ["", "## What each silo sent the server", "", released_text(cfg)]
    lines += ["", "## Training", "",
              f"- {trained} federated rounds, strategy `{cfg.get('strategy')}`, local epochs {cfg.get('local-epochs')}, "
              f"lr {cfg.get('lr')}, {cfg.get('batch-users')} users per step (expected)",
              "", "## Metrics (test split, averaged over users of all silos)", "",
              "| round | " + " | ".join(_METRICS) + " |", "|---" * (len(_METRICS) + 1) + "|"]
    for row in (rounds[0], last) if len(rounds) > 1 else rounds:
        lines.append(f"| {row['round']} | " + " | ".join(
            f"{row[m]:.4f}" if isinstance(row.get(m), (int, float)) else "-" for m in _METRICS) + " |")
    lines += ["", "Round 0 is the pretrained encoder before federated training.", "",
              "## Run configuration", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def check_readable(final: Path) -> None:
    """Every file an export copies from ``final`` reads back: each safetensors file's header and
    sizes (:func:`~uirl.tensor_files.check_tensor_file`), each JSON file parses, the prior and the
    released sum load."""
    import numpy as np

    for name in FILES + OPTIONAL_FILES:
        path = final / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            check_tensor_file(path)
        elif name.endswith(".json"):
            read_json_object(path)
        else:
            try:
                read_release(path) if name == RELEASE_FILE else np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"not a readable numpy file ({exc})", file=str(path)) from None


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the final adapter of ``run_dir`` and its model card to ``out`` (which must not exist)."""
    run_dir, out = Path(run_dir), Path(out)
    final = run_dir / "final"
    missing = [name for name in FILES if not (final / name).is_file()]
    if missing:
        raise UirlError(f"{run_dir}: not a finished run (missing final/{missing[0]})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UirlError(f"{out}: already exists; choose a new output directory")
    check_readable(final)  # before anything is written: a damaged file is never exported
    meta = read_json_object(final / "uirl_model.json")
    card = model_card(run_dir, meta)
    with atomic_dir(out) as tmp:
        for name in FILES + OPTIONAL_FILES:
            if (final / name).is_file():
                shutil.copy2(final / name, tmp / name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def load_exported(directory: str | Path, *, base_model: str | None = None):
    """The interest model of an export (or a run's ``final/``), with every interest-model part the
    run trained (levels, facets, views, heads, VAE): :func:`uirl.model.build.load_trained`, in eval
    mode. ``base_model`` overrides where the base encoder is. Returns (InterestModel, tokenizer)."""
    from uirl.model.build import load_trained

    model, encoder, _ = load_trained(directory, model_name=base_model)
    model.eval()
    return model, encoder.tokenizer
