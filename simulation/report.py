"""Privacy-utility report: ``python -m simulation.report RESULTS [--out DIR]``.

Reads a sweep's ``results.jsonl`` (or its directory) and writes, into ``DIR`` (default: the
results directory's ``report/``):

- ``utility_vs_epsilon.png``: test AUC against epsilon for user-level DP (per silo) and client-level
  central DP, with every non-private method as a horizontal line;
- ``utility_vs_round.png``: test AUC round by round for every trained method;
- ``epsilon_vs_round.png``: each silo's user-level epsilon spent round by round;
- ``mia_vs_epsilon.png``: membership-inference AUC (loss and calibrated attacks) against epsilon;
- ``report.md``: the tables behind the plots, the accounting of every row, and the exact
  configuration (the sweep file and each cell's full run config) to reproduce them.

Rows with equal method and target epsilon (e.g. several seeds) are averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from uirl.errors import UirlError

BASELINES = ("centralized", "local-only", "popularity", "popularity-global", "zero-shot", "sasrec")
_METRICS = ("auc", "mrr", "ndcg@10", "recall@10")
_MIA = ("mia-loss-auc", "mia-loss-tpr@1%", "mia-loss-tpr@0.1%", "mia-calibrated-auc", "mia-calibrated-tpr@1%",
        "mia-calibrated-tpr@0.1%", "mia-loss-auc-reference")
_LABEL = {"federated": "federated", "central-dp": "federated + central DP", "centralized": "centralized",
          "local-only": "local only", "popularity": "popularity (per silo)",
          "popularity-global": "popularity (global)", "zero-shot": "zero-shot",
          "sasrec": "SASRec (centralized)"}
#: Full-catalogue metrics (only the rows that report them, e.g. sasrec).
_FULL = ("full/recall@10", "full/ndcg@10", "full/recall@20", "full/ndcg@20")


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a results file. A torn last line (the sweep was killed while writing) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def target_epsilon(row: dict[str, Any]) -> float:
    """The epsilon a row was configured for (inf without DP)."""
    if row.get("guarantee", "none") == "none":
        return math.inf
    return float(row["run-config"]["target-epsilon"])


def _mean(values: list[float]) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target epsilon): numeric fields averaged, ``seeds`` counted."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], target_epsilon(row))].append(row)
    out = []
    for (method, eps), members in groups.items():
        first = members[0]
        merged = {k: v for k, v in first.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
        for key in {k for r in members for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}:
            merged[key] = _mean([r.get(key) for r in members])
        merged.update({"method": method, "target": eps, "seeds": len(members), "members_rows": members})
        shares = int(first.get("run-config", {}).get("popularity-noise-shares", 1))
        if shares > 1 and merged.get("guarantee", "none") != "none":
            merged["guarantee"] += f", release: SecAgg+ sum of {shares} noise shares"
        if first.get("run-config", {}).get("local-prior") is True:
            merged["guarantee"] += "; silos score with their own counts (local prior)"
        out.append(merged)
    order = {m: i for i, m in enumerate(("federated", "central-dp") + BASELINES)}
    return sorted(out, key=lambda r: (order.get(r["method"], 99), r["target"]))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def utility_table(groups: list[dict[str, Any]]) -> str:
    header = ["method", "guarantee", "target eps", "eps spent", "delta", "noise", "sample rate", "steps",
              "accountant", "AUC", "MRR", "nDCG@10", "R@10", "seeds", "s/run"]
    body = [[_LABEL.get(g["method"], g["method"]), g.get("guarantee", "none"), _fmt(g["target"], 1),
             _fmt(g.get("epsilon"), 3), _fmt(g.get("delta"), 6) if g.get("delta") else "-",
             _fmt(g.get("noise-multiplier"), 3) if g.get("noise-multiplier") else "-",
             _fmt(g.get("sample-rate"), 3), _fmt(g.get("steps"), 0), g.get("accountant") or "-",
             *(g.get(m) for m in _METRICS), str(g["seeds"]), _fmt(g.get("seconds"), 0)] for g in groups]
    return _table(header, body)


#: The headline table's metrics: sampled-list and full-catalogue ranking, in points (x100).
_HEADLINE = (("nDCG@10", "ndcg@10"), ("AUC", "auc"), ("full R@20", "full/recall@20"), ("full nDCG@10", "full/ndcg@10"))


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sd`` over seeds (sample standard deviation; the mean alone for one seed)."""
    values = [float(v) * scale for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def headline_table(groups: list[dict[str, Any]]) -> str:
    """Methods x metrics, mean ± sd over the group's seeds; minutes and peak memory per run."""
    header = ["method", "eps (per silo)", *(name for name, _ in _HEADLINE), "min/run", "peak GB", "seeds"]
    body = []
    for g in groups:
        members = g["members_rows"]
        body.append([_LABEL.get(g["method"], g["method"]), _fmt(g["target"], 1),
                     *(_spread([r.get(key) for r in members], 100.0) for _, key in _HEADLINE),
                     _spread([r.get("seconds") for r in members], 1 / 60),
                     _spread([r.get("peak-rss-gb") for r in members], 1.0, 2),
                     str(len(members))])
    return _table(header, body)


def full_table(groups: list[dict[str, Any]]) -> str:
    scored = [g for g in groups if _FULL[0] in g]
    header = ["method", "guarantee", "target eps", "full R@10", "full nDCG@10", "full R@20", "full nDCG@20", "seeds"]
    body = [[_LABEL.get(g["method"], g["method"]), g.get("guarantee", "none"), _fmt(g["target"], 1),
             *(g.get(k) for k in _FULL), str(g["seeds"])] for g in scored]
    return _table(header, body)


def mia_table(groups: list[dict[str, Any]]) -> str:
    audited = [g for g in groups if "mia-loss-auc" in g]
    header = ["method", "guarantee", "eps", "members", "non-members", "loss AUC", "loss TPR@1%FPR",
              "loss TPR@0.1%FPR", "calibrated AUC", "cal. TPR@1%FPR", "cal. TPR@0.1%FPR", "loss AUC on reference"]
    body = [[_LABEL.get(g["method"], g["method"]), g.get("guarantee", "none"), _fmt(g["target"], 1),
             _fmt(g.get("members"), 0), _fmt(g.get("nonmembers"), 0), *(g.get(k) for k in _MIA)] for g in audited]
    return _table(header, body)


def _x(eps: float, finite: list[float]) -> float:
    """Plot position: epsilon itself, or a slot right of the largest finite one for inf."""
    return eps if math.isfinite(eps) else (max(finite) * 2.5 if finite else 1.0)


def _epsilon_axis(ax, finite: list[float]) -> None:
    ax.set_xscale("log")
    ticks = sorted(set(finite)) + [_x(math.inf, finite)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks[:-1]] + ["inf\n(no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (target; delta in the report)")


def plot_utility_vs_epsilon(groups: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = sorted({g["target"] for g in groups if math.isfinite(g["target"])})
    fed = [g for g in groups if g["method"] == "federated"]
    nonprivate = next((g for g in fed if math.isinf(g["target"])), None)
    for method, marker, label in (("federated", "o", "federated + user-level DP (per silo)"),
                                  ("central-dp", "s", "federated + client-level central DP")):
        pts = sorted((g["target"], g["auc"]) for g in groups if g["method"] == method)
        if method == "central-dp" and nonprivate is not None:
            pts.append((math.inf, nonprivate["auc"]))
        if pts:
            ax.plot([_x(e, finite) for e, _ in pts], [a for _, a in pts], marker=marker, label=label)
    styles = iter(["--", "-.", ":", (0, (5, 1)), (0, (1, 3))])
    for g in groups:
        if g["method"] in BASELINES:
            ax.axhline(g["auc"], linestyle=next(styles, "--"), color="gray" if g["method"] != "centralized" else "k",
                       label=f"{_LABEL[g['method']]} ({g['auc']:.3f})")
    _epsilon_axis(ax, finite)
    ax.set_ylabel("test AUC (higher is better)")
    ax.set_title("Privacy-utility trade-off")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_utility_vs_round(groups: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        rounds = g["members_rows"][0].get("rounds") or []
        if len(rounds) < 2:
            continue
        eps = "no DP" if math.isinf(g["target"]) else f"eps={g['target']:g}"
        ax.plot([r["round"] for r in rounds], [r.get("auc") for r in rounds], marker=".",
                label=f"{_LABEL.get(g['method'], g['method'])}, {eps}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = pretrained, before training)")
    ax.set_ylabel("test AUC")
    ax.set_title("Utility round by round (first seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_epsilon_vs_round(groups: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        if g["method"] not in ("federated", "central-dp") or math.isinf(g["target"]):
            continue
        rounds = g["members_rows"][0].get("rounds") or []
        keys = sorted({k for r in rounds for k in r if k.startswith("epsilon/silo-")}) or ["epsilon"]
        for key in keys:
            xs = [r["round"] for r in rounds if key in r]
            who = key.split("/")[-1] if "/" in key else "client-level"
            ax.plot([0] + xs, [0.0] + [r[key] for r in rounds if key in r], marker=".",
                    linestyle="-" if g["method"] == "federated" else "--",
                    label=f"{_LABEL[g['method']]} target {g['target']:g}: {who}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("Privacy spent round by round")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mia_vs_epsilon(groups: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    audited = [g for g in groups if "mia-loss-auc" in g and g["method"] in ("federated", "central-dp")]
    finite = sorted({g["target"] for g in audited if math.isfinite(g["target"])})
    for method in ("federated", "central-dp"):
        pts = sorted((g["target"], g) for g in audited if g["method"] == method)
        if not pts:
            continue
        for key, style in (("mia-loss-auc", "o-"), ("mia-calibrated-auc", "s--")):
            ax.plot([_x(e, finite) for e, _ in pts], [g[key] for _, g in pts], style,
                    label=f"{_LABEL[method]}: {key.split('-')[1]} attack")
    ref = [g["mia-loss-auc-reference"] for g in audited if "mia-loss-auc-reference" in g]
    if ref:
        ax.axhline(_mean(ref), color="gray", linestyle=":", label="loss attack on the untrained reference")
    ax.axhline(0.5, color="k", linewidth=0.8)
    _epsilon_axis(ax, finite)
    ax.set_ylabel("membership-inference AUC (0.5 = no leak)")
    ax.set_title("Empirical privacy audit" if audited else "Empirical privacy audit (no audited runs)")
    if audited:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {"utility_vs_epsilon.png": plot_utility_vs_epsilon, "utility_vs_round.png": plot_utility_vs_round,
         "epsilon_vs_round.png": plot_epsilon_vs_round, "mia_vs_epsilon.png": plot_mia_vs_epsilon}


def markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]], sweep_text: str | None,
             results: Path) -> str:
    # The seed assigns users to silos (and, on synthetic data, makes the data): lists are compared
    # between the methods of one seed.
    by_seed: dict[Any, set] = defaultdict(set)
    for r in rows:
        by_seed[r.get("run-config", {}).get("seed")].add(r.get("candidates"))
    mixed = sorted(str(seed) for seed, prints in by_seed.items() if len(prints) > 1)
    same = "yes" if not mixed else f"NO (seed {', '.join(mixed)}: different candidate sets)"
    seconds = sum(float(r.get("seconds", 0)) for r in rows)
    parts = ["# Privacy-utility report", "",
             f"{len(rows)} runs from `{results.name}` ({seconds / 60:.1f} min of compute in all). "
             f"Every method of a seed scored on the same test candidate lists: {same}.", "",
             "![utility vs epsilon](utility_vs_epsilon.png)", "", "## Headline", "",
             "Test metrics in points (x100), mean ± standard deviation over seeds; 20-candidate lists "
             "(nDCG@10, AUC) and every item the user has not touched (full R@20, full nDCG@10); minutes and "
             "peak resident memory of one run (each run in its own process).", "", headline_table(groups), "",
             "## Utility and accounting", "",
             "Test metrics of the final model, averaged over silos with user-count weights. "
             "`user-level per silo`: each silo's released updates are (eps, delta)-DP with respect to "
             "one of its users; `client-level`: the global model is (eps, delta)-DP with respect to one "
             "whole silo (the server adds the noise); `none`: no formal guarantee; `release: SecAgg+ sum "
             "of k noise shares`: the popularity release's noise is split over the silos and only its sum is "
             "seen, so its share of the guarantee assumes at least k honest silos (README, Distributed noise "
             "for the popularity release); `local prior`: each silo scores its own users with its own "
             "exact item counts plus the other silos' part of the released sum, training with the released "
             "prior only (README, Run configuration).", "",
             utility_table(groups), ""]
    if any(_FULL[0] in g for g in groups):
        parts += ["Ranked against the whole catalogue instead of the sampled candidates (the items the user "
                  "touched before are left out; the target never is):", "", full_table(groups), ""]
    if any("mia-loss-auc" in g for g in groups):
        parts += ["## Membership-inference audit", "",
                  "Members: the users a model was trained on; non-members: users of the same silos held "
                  "out of training. Loss attack: lower loss = member. Calibrated attack: the user's loss "
                  "under the pretrained starting model minus under the trained one. TPR at an FPR below "
                  "1 / non-members is the TPR at zero false positives. Last column: the loss attack "
                  "against the untrained reference, i.e. what this split alone gives.", "",
                  mia_table(groups), "", "![MIA vs epsilon](mia_vs_epsilon.png)", ""]
    parts += ["## Round by round", "", "![utility vs round](utility_vs_round.png)", "",
              "![epsilon vs round](epsilon_vs_round.png)", "", "## Configuration", ""]
    if sweep_text:
        parts += ["The sweep file:", "", "```toml", sweep_text.rstrip(), "```", ""]
    parts += ["Each run's full run config (every key, defaults included):", "", "<details>", "",
              "| key | method | seed | run config |", "|---|---|---|---|"]
    for r in rows:
        parts.append(f"| `{r['key']}` | {r['method']} | {r['run-config'].get('seed')} | "
                     f"`{json.dumps(r['run-config'], sort_keys=True)}` |")
    parts += ["", "</details>", ""]
    return "\n".join(parts)


def build_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write the plots and ``report.md``; return the output directory."""
    import matplotlib

    matplotlib.use("Agg")
    from uirl.atomic import atomic_write_text

    results = Path(results)
    if results.is_dir():
        results = results / "results.jsonl"
    rows = read_results(results)
    if not rows:
        raise UirlError(f"{results}: no results (run python -m simulation.sweep first)")
    out = Path(out) if out else results.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group(rows)
    for name, plot in PLOTS.items():
        plot(groups, out / name)
    sweep_file = results.parent / "sweep.toml"
    text = markdown(rows, groups, sweep_file.read_text(encoding="utf-8") if sweep_file.exists() else None, results)
    atomic_write_text(out / "report.md", text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.jsonl of a sweep, or its directory")
    parser.add_argument("--out", default=None, help="output directory (default: <results dir>/report)")
    args = parser.parse_args(argv)
    try:
        out = build_report(args.results, args.out)
    except UirlError as exc:
        print(f"uirl: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.md'} and {len(PLOTS)} plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
