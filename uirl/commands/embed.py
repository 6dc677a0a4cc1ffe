"""``uirl embed MODEL_DIR --out users.npz|users.parquet``: every user's interest vectors.

Loads a trained model (a run's ``final/`` directory: PEFT adapter + interest head + run config),
reads the run's dataset silo by silo, and writes per user: the top-level ``interest`` vector (what
scores items), the ``facets`` (K, d) when facets are on, the hierarchy's ``level_*`` vectors, and
the per-view ``view_*`` vectors with ``view_*_present`` flags when several views are on. The
history is the user's whole positive sequence (``--split full``, default) or what precedes the
validation / test target.

These vectors describe individual users: they are computed on the silo that holds the users'
data and are not protected by the training's differential privacy (only the model is).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from uirl.atomic import atomic_file
from uirl.errors import UirlError

if TYPE_CHECKING:  # torch, transformers and peft load only when the command runs (fast --help)
    from uirl.config import Config
    from uirl.data.silo import Silo
    from uirl.model import InterestModel, TextBank
    from uirl.model.interest import UserRep


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a trained model: a run's final/ directory")
    parser.add_argument("--num-silos", type=int, default=3,
                        help="how many silos the run's data was split into (default 3, the default run's)")
    parser.add_argument("--silo", type=int, action="append", default=None,
                        help="only this silo's users (repeatable; default: every silo)")
    parser.add_argument("--model-name", default=None, help="where the base encoder is, if not where the run had it")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def load(args: argparse.Namespace) -> tuple[InterestModel, Config, list[tuple[Silo, TextBank]]]:
    """The trained model (on ``args.device``, eval mode) and the silos it should read, each with
    its text bank."""
    from uirl.config import SiloConfig
    from uirl.data.silo import load_silo
    from uirl.federated import ReleasedSum, attach_prior, local_prior, silo_bank
    from uirl.model.build import load_prior, load_release, load_trained
    from uirl.train import resolve_device

    if args.num_silos < 1:
        raise UirlError(f"--num-silos must be >= 1, not {args.num_silos}")
    ids = args.silo if args.silo is not None else list(range(args.num_silos))
    bad = [k for k in ids if not 0 <= k < args.num_silos]
    if bad:
        raise UirlError(f"--silo {bad[0]}: expected a silo in [0, {args.num_silos - 1}]")
    model, encoder, cfg = load_trained(args.model_dir, model_name=args.model_name)
    prior = load_prior(args.model_dir, cfg)
    release = load_release(args.model_dir, cfg)  # local-prior: each silo ranks with its own counts too
    model.to(resolve_device(args.device)).eval()
    silos = [load_silo(cfg.data, SiloConfig(partition_id=k, num_partitions=args.num_silos), seed=cfg.train.seed)
             for k in ids]
    banks = [silo_bank(silo, encoder.tokenizer, cfg) for silo in silos]
    for silo, bank in zip(silos, banks):
        attach_prior(bank, silo, prior if release is None else local_prior(cfg, silo, ReleasedSum(*release)))
    return model, cfg, list(zip(silos, banks))


def atomic_output(path: Path, write) -> None:
    """``write(temp_path)``, then rename over ``path``: a reader never sees a half-written file."""
    with atomic_file(path) as tmp:
        write(tmp)


def vectors_of(rep: UserRep) -> dict[str, np.ndarray]:
    """One user's named vectors (a :class:`UserRep` of one user)."""
    out = {"interest": rep.interest[0]}
    if rep.facets is not None:
        out["facets"] = rep.facets[0]
    out.update({f"level_{name}": v[0] for name, v in rep.levels.items()})
    for name, v in rep.views.items():
        out[f"view_{name}"] = v[0]
        out[f"view_{name}_present"] = rep.present[name][0]
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def write_vectors(path: Path, user_ids: Sequence[str], rows: list[dict[str, np.ndarray]]) -> None:
    if path.suffix == ".npz":
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, user_id=np.array(user_ids), **{k: np.stack([r[k] for r in rows]) for k in rows[0]})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write(tmp: Path) -> None:
            columns = {"user_id": pa.array(list(user_ids), pa.string())}
            kinds = {0: pa.bool_(), 1: pa.list_(pa.float32()), 2: pa.list_(pa.list_(pa.float32()))}
            for k in rows[0]:
                columns[k] = pa.array([r[k].tolist() for r in rows], kinds[rows[0][k].ndim])
            pq.write_table(pa.table(columns), tmp)
    atomic_output(path, write)


def _embed(args: argparse.Namespace) -> int:
    from uirl.train import represent_users

    out = Path(args.out)
    if out.suffix not in (".npz", ".parquet"):
        raise UirlError(f"--out {out}: expected a .npz or .parquet file name")
    model, cfg, silos = load(args)
    user_ids, rows = [], []
    for silo, bank in silos:
        reps, _ = represent_users(model, bank, silo.users, split=args.split, max_history=cfg.data.max_history)
        user_ids += [u.user_id for u in silo.users]
        rows += [vectors_of(rep) for rep, _ in reps]
    if not rows:
        raise UirlError("no users to embed")
    write_vectors(out, user_ids, rows)
    print(f"uirl: {len(rows)} users' interest vectors ({', '.join(rows[0])}) in {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    embed = sub.add_parser("embed", help="write every user's interest vectors (facets, levels, views)")
    add_model_arguments(embed)
    embed.add_argument("--out", required=True, help="output file: .npz or .parquet")
    embed.add_argument("--split", choices=("full", "test", "valid"), default="full",
                       help="history: the whole sequence (full), or what precedes the test/valid target")
    embed.set_defaults(func=_embed)

