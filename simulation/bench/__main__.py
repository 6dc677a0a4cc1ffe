"""Where a run's time, memory and bytes go: one command, one JSON file, one table.

    python -m simulation.bench [--quick] [--only step,threads,scaling,anatomy,bytes,padding,decoder,deployment] [--out docs/results/bench.json]

Sections (all but ``decoder`` and ``deployment`` by default; ``anatomy`` is left out of ``--quick``
unless named in ``--only``):

- ``step``: one training step on the same batch (N users of the synthetic default, one training
  example each), ``lora`` mode, all-MiniLM-L6-v2 with the default LoRA config: non-private, the
  project's user-level DP step, and plain Opacus clipping per text row; the ``cached`` mode's
  steps on the same users. Steps take turns (interleaved repeats); median, min, max.
- ``threads``: the same DP and non-private steps and a silo's evaluation at 1 and 2 torch threads,
  interleaved.
- ``scaling``: the in-process engine with the tiny model at 3, 10, 30, 100 silos of 30 users, each
  cell in its own process: wall time, time per round, peak RSS.
- ``anatomy``: one real ``flwr run`` of the tiny model, split into start-up, training, evaluation,
  checkpoints and shut-down, with the peak memory of all its processes.
- ``bytes``: a silo's reply (each ``compression`` mode) and the server's message, next to the
  encoder's bytes, per train mode (:func:`uirl.wire.wire_bytes`).
- ``padding``: the share of a ``lora`` step's token positions that is padding, and what per-user
  micro-batches or per-row length buckets would leave (:mod:`simulation.bench.padding`; counts, no
  timing).
- ``decoder`` (only when named in ``--only``): the ``lora`` non-private and DP steps with a decoder
  LLM of a published shape and random weights as the encoder (``--decoder``, default Qwen2-0.5B's
  shape; ``tiny`` with ``--quick``), their model FLOPs, TFLOP/s and model FLOP utilisation on the
  run config's ``device`` (:mod:`simulation.bench.decoder`). Meant for a GPU:
  ``--only decoder --run-config "device='cuda'"``.
- ``deployment`` (only when named in ``--only``): real ``uirl deploy`` runs (3 silos x 3 rounds, tiny
  model, TLS and SuperNode authentication on loopback) with and without silo workers, taking turns
  (``--pairs``; ``--deployment-silos``, default 3): seconds per round (:mod:`simulation.bench.deployment`).

``--run-config`` overrides apply to the step, threads, padding and bytes sections (a converted
dataset, say); the scaling and anatomy sections always use the tiny model on synthetic data.

``--quick`` uses the tiny random encoder everywhere, fewer users and repeats, 3 and 10 silos and one
round: a smoke test of the machinery (tests/test_bench.py), not numbers to quote. The JSON records
the machine (CPU, cores, load average before and after, versions, torch threads) next to the
numbers, and checks them against the performance targets. Item vectors of the cached mode go to a
temporary ``$UIRL_CACHE``, so every run starts cold and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("step", "threads", "scaling", "anatomy", "bytes", "padding", "decoder", "deployment")
#: Sections run when ``--only`` is not given (``decoder`` builds a 0.5B+ model, ``deployment`` takes
#: minutes a run: ask for them).
DEFAULT_SECTIONS = SECTIONS[:-2]
TINY_LABEL = "tiny random BERT (simulation/tiny_encoder.py: 2 layers, hidden 32)"
#: The issue's targets: DP step / non-private step at the default thread setting; 100 silos x 5 rounds.
DP_RATIO_TARGET = 1.10
SCALE_SECONDS_TARGET = 300.0
SCALE_MEMORY_TARGET_MIB = 6e9 / 2**20  # 6 GB


def _relabel(value, path: str, label: str):
    """``value`` with every mention of the temporary tiny model's path replaced by ``label``."""
    if isinstance(value, dict):
        return {k: _relabel(v, path, label) for k, v in value.items()}
    if isinstance(value, list):
        return [_relabel(v, path, label) for v in value]
    return value.replace(path, label) if isinstance(value, str) else value


def targets(sections: dict) -> list[dict]:
    """Each target with what was measured and whether it was met (None: not measured)."""
    out = []
    step = sections.get("step")
    ratio = step["ratio"]["dp/non-private"] if step else None
    out.append({"target": f"DP step at most {DP_RATIO_TARGET:.2f} x the non-private step (lora, default threads)",
                "measured": ratio, "met": None if ratio is None else ratio <= DP_RATIO_TARGET,
                "torch-threads": step["torch-threads"] if step else None})
    big = next((c for c in sections.get("scaling", {}).get("cells", []) if c["silos"] == 100), None)
    five = big is not None and big["rounds"] == 5
    wall = big["wall-seconds"] if five else None
    out.append({"target": "100 silos x 5 rounds (tiny model) in under 5 minutes", "measured-seconds": wall,
                "finished": None if not five else not big["timed-out"],
                "met": None if not five else (not big["timed-out"] and wall < SCALE_SECONDS_TARGET)})
    peak = big["peak-rss-mib"] if five else None
    out.append({"target": "100 silos x 5 rounds (tiny model) in under 6 GB", "measured-peak-rss-mib": peak,
                "met": None if not five else (not big["timed-out"] and peak < SCALE_MEMORY_TARGET_MIB)})
    deployed = sections.get("deployment")
    round_seconds = deployed["median-round-seconds"]["silo-workers"] if deployed else None
    from simulation.bench.deployment import ROUND_SECONDS_TARGET

    out.append({"target": f"a deployment round (tiny model, loopback) in under {ROUND_SECONDS_TARGET:g} s",
                "measured-seconds": round_seconds,
                "met": None if round_seconds is None else round_seconds < ROUND_SECONDS_TARGET})
    return out


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def print_tables(result: dict, console) -> None:
    from rich.table import Table

    m = result["machine"]
    console.print(f"[bold]machine[/bold] {m['cpu-model']}, {m['cores']} cores, torch {m['torch']} "
                  f"({m['torch-threads']} threads), flwr {m['flwr']}; load average {m['load-average-before']} "
                  f"before, {m['load-average-after']} after (1, 5, 15 min)")
    s = result["sections"]
    if "step" in s:
        st = s["step"]
        t = Table(title=f"one step, {st['users']} users x {st['texts-per-user']} texts ({st['texts']} texts), "
                        f"{st['torch-threads']} threads, median of {st['repeats']}")
        for col in ("step", "median s", "min s", "max s", "users/s", "texts/s", "/ non-private"):
            t.add_column(col, justify="right" if col != "step" else "left")
        for name, sec in st["seconds"].items():
            base = st["seconds"]["cached-non-private" if name.startswith("cached") else "non-private"]["median"]
            t.add_row(name, _fmt(sec["median"]), _fmt(sec["min"]), _fmt(sec["max"]),
                      _fmt(st["users-per-second"][name], 1), _fmt(st["texts-per-second"].get(name), 1),
                      _fmt(sec["median"] / base, 2))
        console.print(t)
    if "threads" in s:
        th = s["threads"]
        t = Table(title=f"threads ({th['ratio-means']})")
        for col in ("work", *(f"{n} thread(s) s" for n in th["thread-counts"]), "ratio"):
            t.add_column(col)
        for what in th["ratio"]:
            t.add_row(what, *(_fmt(th["seconds"][f"{what}@{n}"]["median"]) for n in th["thread-counts"]),
                      _fmt(th["ratio"][what], 2))
        t.add_row("dp / non-private", *(_fmt(th["dp/non-private"][str(n)], 2) for n in th["thread-counts"]), "")
        console.print(t)
    if "scaling" in s:
        sc = s["scaling"]
        t = Table(title=f"in-process engine, {sc['users-per-silo']} users per silo, {sc['rounds']} round(s)")
        for col in ("silos", "wall s", "round 0 s", "s / round", "peak RSS MiB", "rounds done"):
            t.add_column(col, justify="right")
        for c in sc["cells"]:
            t.add_row(str(c["silos"]), _fmt(c["wall-seconds"], 1) + (" (stopped)" if c["timed-out"] else ""),
                      _fmt(c.get("round-0-seconds"), 1), _fmt(c.get("seconds-per-round"), 1),
                      _fmt(c["peak-rss-mib"]), f"{c['rounds-done']}/{c['rounds']}")
        console.print(t)
    if "anatomy" in s:
        an = s["anatomy"]
        t = Table(title=f"flwr run, {an['silos']} silos x {an['rounds']} rounds, tiny model")
        t.add_column("phase")
        t.add_column("seconds", justify="right")
        for phase in ("start-up", "round-0", "training", "evaluation", "checkpoint", "shut-down", "wall"):
            t.add_row(phase, _fmt(an["seconds"][phase], 1))
        t.add_row("per round: flwr run / in-process", f"{_fmt(an['flower-seconds-per-round'], 1)} / "
                  f"{_fmt(an['in-process-seconds-per-round'], 1)}")
        mem = an["memory"]
        if mem.get("measured"):
            t.add_row("peak memory, all processes (PSS / RSS MiB)",
                      f"{mem['peak-pss-sum-mib']:,} / {mem['peak-rss-sum-mib']:,}")
        console.print(t)
    if "deployment" in s:
        de = s["deployment"]
        t = Table(title=f"uirl deploy, {de['silos']} silos x {de['rounds']} rounds, tiny model, loopback (TLS)")
        for col in ("silo workers", "up s", "round 0 s", "seconds per round", "median s", "silo work s/round",
                    "wall s"):
            t.add_column(col, justify="right" if col != "silo workers" else "left")
        for run in de["runs"]:
            t.add_row("yes" if run["silo-workers"] else "no", _fmt(run["up-seconds"], 1),
                      _fmt(run["seconds"]["round-0"], 1), " ".join(_fmt(x, 1) for x in run["round-seconds"]),
                      _fmt(run["median-round-seconds"], 1),
                      _fmt(run.get("slowest-silo-work-per-round-seconds"), 2), _fmt(run["seconds"]["wall"], 1))
        console.print(t)
    if "bytes" in s:
        t = Table(title="bytes per silo and round (array values)")
        for col in ("mode", "downlink", "reply", "reply fp16", "reply int8", "encoder", "reply / encoder"):
            t.add_column(col, justify="right" if col != "mode" else "left")
        for mode, b in s["bytes"]["modes"].items():
            t.add_row(mode, _fmt(b["downlink-bytes"]), _fmt(b["reply-bytes-none"]), _fmt(b["reply-bytes-fp16"]),
                      _fmt(b["reply-bytes-int8"]), _fmt(b["encoder-bytes"]),
                      f"{100 * b['reply-fraction-none']:.2f} %")
        console.print(t)
    if "padding" in s:
        pd = s["padding"]
        t = Table(title=f"lora step: token positions, {pd['users']} users, {pd['rows']} texts, "
                        f"{pd['real-tokens']:,} real tokens")
        for col in ("layout", "calls", "positions", "padding share", "/ one call"):
            t.add_column(col, justify="right" if col != "layout" else "left")
        t.add_row("one call (now)", "1", _fmt(pd["one-call-positions"]), f"{100 * pd['one-call-padding-share']:.1f} %", "1.00")
        for name, lay in pd["layouts"].items():
            t.add_row(name, str(lay["calls"]), _fmt(lay["positions"]), f"{100 * lay['padding-share']:.1f} %",
                      _fmt(lay["positions/one-call"], 2))
        console.print(t)
    if "decoder" in s:
        de = s["decoder"]
        d = de["decoder"]
        t = Table(title=f"lora step, random {de['shape']} decoder ({d['layers']} layers, hidden {d['hidden']}, "
                        f"{d['matrix-parameters']:,} matrix parameters) on {de['device-name'] or de['device']}, "
                        f"{de['users']} users, {de['texts']} texts, {de['positions']:,} positions, "
                        f"{de['model-flops-per-step'] / 1e12:.3f} model TFLOPs a step, median of {de['repeats']}")
        for col in ("step", "median s", "TFLOP/s", f"MFU ({de['arithmetic']} peak)", "MFU (bf16 peak)"):
            t.add_column(col, justify="right" if col != "step" else "left")
        for kind, sec in de["seconds"].items():
            mfu, bf16 = de["mfu"][kind], de["mfu-vs-bf16-peak"][kind]
            t.add_row(kind, _fmt(sec["median"]), f"{de['tflops'][kind]:.3g}",
                      "-" if mfu is None else f"{100 * mfu:.1f} %", "-" if bf16 is None else f"{100 * bf16:.1f} %")
        console.print(t)
    for tg in result["targets"]:
        met = {True: "[green]met[/green]", False: "[red]not met[/red]", None: "not measured"}[tg["met"]]
        console.print(f"target: {tg['target']}: {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections ({', '.join(SECTIONS)}; all but decoder by default)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke test (about a minute)")
    parser.add_argument("--out", default="docs/results/bench.json")
    parser.add_argument("--users", type=int, default=None, help="users per step (default 32; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per step (default 7; quick 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the step section and the scaling cells (default: torch's own choice)")
    parser.add_argument("--silos", default=None, help="silo counts for scaling (default 3,10,30,100; quick 3,10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scaling cell (default 5; quick 1)")
    parser.add_argument("--cell-timeout", type=float, default=600.0, help="seconds before a scaling cell is stopped")
    parser.add_argument("--run-config", default="",
                        help="run-config overrides for the step, threads, padding, bytes and decoder sections, "
                             "e.g. \"dataset='/data/ml-uirl' partitioning='iid'\"")
    parser.add_argument("--decoder", default=None,
                        help="decoder section: the shape (qwen2-0.5b, llama-1b or tiny; default qwen2-0.5b, quick tiny)")
    parser.add_argument("--pairs", type=int, default=1,
                        help="deployment section: runs with and without silo workers, taking turns (default 1)")
    parser.add_argument("--deployment-silos", type=int, default=3,
                        help="deployment section: silos (SuperNodes) per deployment (default 3)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="decoder section: the device's peak TFLOP/s for MFU (default: datasheet value of a known GPU)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    from simulation.bench.decoder import SHAPES

    if args.decoder is not None and args.decoder not in SHAPES:
        parser.error(f"--decoder must be one of {', '.join(SHAPES)}, not {args.decoder!r}")
    if (args.decoder is not None or args.peak_tflops is not None) and "decoder" not in only:
        parser.error("--decoder and --peak-tflops apply to the decoder section: add it, e.g. --only decoder")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        parser.error(f"--peak-tflops must be a number > 0, not {args.peak_tflops}")
    if args.pairs < 1 or args.deployment_silos < 1:
        parser.error(f"--pairs and --deployment-silos must be >= 1, not {args.pairs} and {args.deployment_silos}")
    if args.quick and "anatomy" in only and args.only == ",".join(DEFAULT_SECTIONS):
        only.remove("anatomy")
    from uirl.config import from_run_config
    from uirl.errors import UirlError
    from uirl.launch.run_config import parse_overrides

    try:
        overrides = parse_overrides(args.run_config)
        from_run_config({"device": "cpu", **overrides})  # refuse unknown keys and bad values before any work
    except UirlError as why:
        parser.error(str(why))
    users = args.users or (16 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 7)
    silos = [int(x) for x in (args.silos or ("3,10" if args.quick else "3,10,30,100")).split(",")]
    rounds = args.rounds or (1 if args.quick else 5)

    work = Path(tempfile.mkdtemp(prefix="uirl-bench-"))
    os.environ["UIRL_CACHE"] = str(work / "cache")  # children inherit it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    console = Console(stderr=True)
    log = console.log
    import torch

    from simulation.bench.measure import machine
    from simulation.tiny_encoder import save_tiny_encoder
    from uirl.atomic import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    began, load_before = time.time(), [round(x, 2) for x in os.getloadavg()]
    tiny = save_tiny_encoder(work / "tiny-encoder")
    step_base = {"device": "cpu", **overrides}
    if args.quick:
        step_base.update({"model-name": tiny, "synthetic-users": 90, "synthetic-items": 300})
    lora, cached = (from_run_config({**step_base, "train-mode": m}) for m in ("lora", "cached"))
    sections: dict = {}
    result_paths: list[tuple[str, str]] = [(tiny, TINY_LABEL)]
    try:
        for name in only:
            log(f"section {name}")
            start = time.perf_counter()
            if name == "step":
                from simulation.bench.steps import step_section
                sections[name] = step_section(lora, cached, users=users, repeats=repeats)
            elif name == "threads":
                from simulation.bench.steps import threads_section
                sections[name] = threads_section(lora, cached, users=users, repeats=max(2, repeats // 2))
            elif name == "scaling":
                from simulation.bench.scaling import scaling_section
                base = {"model-name": tiny, "device": "cpu"}
                sections[name] = scaling_section(base, silos=silos, users_per_silo=30, rounds=rounds,
                                                 timeout=args.cell_timeout, threads=args.threads, log=log)
            elif name == "anatomy":
                from simulation.bench.anatomy import anatomy_section
                sections[name] = anatomy_section(tiny, silos=3, rounds=3, users_per_silo=30, work=work, log=log)
            elif name == "decoder":
                from simulation.bench.decoder import decoder_section, save_random_decoder
                shape = args.decoder or ("tiny" if args.quick else "qwen2-0.5b")
                log(f"building a random {shape} decoder")
                decoder = save_random_decoder(work / f"decoder-{shape}", shape)
                sections[name] = decoder_section(from_run_config({**step_base, "train-mode": "lora",
                                                                  "model-name": decoder}),
                                                 users=users, repeats=repeats, peak=args.peak_tflops)
                sections[name]["shape"] = shape
                result_paths.append((decoder, f"random {shape} decoder"))
            elif name == "deployment":
                from simulation.bench.deployment import deployment_section
                sections[name] = deployment_section(tiny, silos=args.deployment_silos, rounds=1 if args.quick else 3,
                                                    pairs=args.pairs, work=work, log=log)
            elif name == "padding":
                from simulation.bench.padding import padding_section
                sections[name] = padding_section(lora, users=users)
            elif name == "bytes":  # the project's own count (uirl.wire), for both train modes
                from uirl.wire import wire_bytes
                sections[name] = {"counted-as": "array values, without the per-array framing of Flower's messages",
                                  "modes": {"lora": wire_bytes(lora), "cached": wire_bytes(cached)}}
            sections[name]["section-seconds"] = round(time.perf_counter() - start, 1)
        measured_on = machine()
        measured_on["load-average-before"] = load_before
        measured_on["load-average-after"] = measured_on.pop("load-average")
        result = {"command": "python -m simulation.bench" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None
                                                                                          else argv)),
                  "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)),
                  "seconds": round(time.time() - began, 1), "machine": measured_on,
                  "sections": sections, "targets": targets(sections)}
        for path, label in result_paths:
            result = _relabel(result, path, label)
        out = Path(args.out)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print_tables(result, Console())
        console.print(f"written to {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
