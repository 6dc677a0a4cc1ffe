"""Publisher formats -> converted dataset: what each reader keeps, and that the lists are fixed."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import publisher_files as pf
from uirl.cli import main
from uirl.data import SyntheticSpec, build_users, generate
from uirl.data.convert import ConvertOptions, convert, resplit
from uirl.data.fixed_split import read_split


def _read(out, name):
    return pq.read_table(out / f"{name}.parquet").to_pandas()


def _split(out):
    return {u.user_id: u for u in read_split(out / "split.parquet")}


def test_ml100k_latin1_titles_genres_users_and_rating_threshold(tmp_path):
    out = tmp_path / "out"
    manifest = convert("movielens", pf.write_ml100k(tmp_path / "ml-100k"), out, ConvertOptions(negatives=3))
    items = _read(out, "items").set_index("item_id")
    assert items.loc["3", "text"] == "Misérables, Les (1995). Genres: Drama, Musical"
    assert items.loc["1", "category"] == "Animation"
    events = _read(out, "events")
    assert len(events) == len(pf.ML100K_RATINGS) and set(events["behavior"]) == {"rate"}
    users = _read(out, "user_attributes").set_index("user_id")
    assert users.loc["196", "occupation"] == "writer" and users.loc["196", "region"] == "zip-5"
    assert users.loc["186", "gender"] == "F"
    split = _split(out)
    assert list(split) == ["196"]  # 186 has only 2 ratings >= 4
    user = split["196"]
    # Ratings >= 4 in time order: 1, 2, 3, (4 is a 3: not positive), 5, 6.
    assert user.train_items == ("1", "2", "3") and user.valid_target == "5" and user.test_target == "6"
    assert len(user.test_candidates) == 4 and not set(user.test_candidates[1:]) & {"1", "2", "3", "4", "5", "6"}
    assert manifest["counts"] == json.loads((out / "manifest.json").read_text())["counts"]
    # A stricter threshold: only the 5s are positive -> fewer than 4 positives, nobody evaluable.
    strict = ConvertOptions(negatives=3, positive_threshold=5.0)
    with pytest.raises(Exception, match="enough positive events"):
        convert("movielens", tmp_path / "ml-100k", tmp_path / "strict", strict)


def test_ml1m_dat_files(tmp_path):
    out = tmp_path / "out"
    convert("movielens", pf.write_ml1m(tmp_path / "ml-1m"), out, ConvertOptions(negatives=2))
    items = _read(out, "items").set_index("item_id")
    assert items.loc["3", "text"] == "Misérables, Les (1995). Genres: Drama, Musical"
    users = _read(out, "user_attributes").set_index("user_id")
    assert users.loc["1", "occupation"] == "K-12 student" and users.loc["1", "age"] == 1
    user = _split(out)["1"]
    assert (user.valid_target, user.test_target) == ("4", "6")  # the rating 2 (movie 5) is not positive


def test_ml_latest_csv_quotes_tags_and_no_genres(tmp_path):
    out = tmp_path / "out"
    convert("movielens", pf.write_ml_latest(tmp_path / "ml-latest-small"), out, ConvertOptions(negatives=2))
    items = _read(out, "items").set_index("item_id")
    assert items.loc["11", "text"] == "American President, The (1995). Genres: Comedy, Drama, Romance"
    assert items.loc["193609", "text"] == "Andrew Dice Clay: Dice Rules (1991)" and pd.isna(items.loc["193609", "category"])
    events = _read(out, "events").set_index(["user_id", "item_id"])
    assert events.loc[("1", "73"), "user_text"] == "musical, based on a book, sort of"  # that user's own tags
    assert events.loc[("2", "1"), "user_text"] == "pixar" and pd.isna(events.loc[("1", "1"), "user_text"])
    assert events.loc[("1", "11"), "value"] == 4.5
    user = _split(out)["1"]
    assert user.train_items == ("1", "11", "73") and user.test_target == "193609"  # the 0.5 is not positive


@pytest.mark.parametrize("writer", [pf.write_amazon2018, pf.write_amazon2023])
def test_amazon_gzip_json_lines(tmp_path, writer):
    out = tmp_path / "out"
    convert("amazon", writer(tmp_path / "amazon"), out, ConvertOptions(negatives=2))
    items, events = _read(out, "items"), _read(out, "events")
    assert set(events["behavior"]) == {"review"} and events["value"].between(1, 5).all()
    assert events["timestamp"].between(1_400_000_000, 1_700_000_000).all()  # 2023's milliseconds -> seconds
    if writer is pf.write_amazon2018:
        assert items["text"].iloc[0] == "Slime Time Fall Fest 0. Category: Books > Children's Books. A story number 0."
        assert events["user_text"].iloc[0] == "Five Stars. As advertised. Reasonably priced 0"
        category = "Books"
    else:
        assert events["user_text"].iloc[0] == "Such a lovely scent but not overpowering. This spray is really nice 0"
        category = "All_Beauty"
    assert set(_read(out, "user_attributes")["category"]) == {category}
    assert len(_split(out)) == 2
    # A single review file works too (its meta_ file is found next to it).
    single = next(p for p in (tmp_path / "amazon").iterdir() if not p.name.startswith("meta_"))
    assert convert("amazon", single, tmp_path / "single", ConvertOptions(negatives=2))["counts"]["events"] == len(events)


def test_mind_impressions_are_the_candidate_lists(tmp_path):
    out = tmp_path / "out"
    convert("mind", pf.write_mind(tmp_path / "MINDsmall_train"), out, ConvertOptions(negatives=2))
    events = _read(out, "events")
    mine = events[events["user_id"] == "U13740"]
    assert mine["item_id"].tolist()[:3] == ["N55528", "N19639", "N61837"]  # history clicks first, in order
    assert mine["behavior"].value_counts().to_dict() == {"click": 6, "view": 4}
    user = _split(out)["U13740"]
    # Last impression: clicked N2073 (target) and N38324 (another positive: not a negative).
    assert user.test_candidates == ("N2073", "N49186", "N59295")
    assert user.valid_candidates == ("N53526", "N38324", "N2073")
    assert user.train_items == ("N55528", "N19639", "N61837")
    items = _read(out, "items").set_index("item_id")
    assert items.loc["N19639", "text"] == ("50 Worst Habits For Belly Fat. health / weightloss. "
                                          "These seemingly harmless habits are holding you back.")
    assert (out / "impressions.parquet").is_file()


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_schema_files_round_trip_and_same_lists_as_the_in_memory_protocol(tmp_path, ext):
    data = generate(SyntheticSpec(num_users=40, num_items=120, num_silos=2, seed=5))
    src = tmp_path / "src"
    src.mkdir()
    for name, frame in (("items", data.items), ("events", data.events)):
        if ext == "jsonl":
            frame.to_json(src / f"{name}.jsonl", orient="records", lines=True)
        elif ext == "csv":
            frame.to_csv(src / f"{name}.csv", index=False)
        else:
            frame.to_parquet(src / f"{name}.parquet", index=False)
    out = tmp_path / "out"
    convert("schema", src, out, ConvertOptions(negatives=7, seed=3))
    events = _read(out, "events")
    pd.testing.assert_series_equal(events["item_id"].astype(str), data.events["item_id"].astype(str),
                                   check_names=False)
    assert (events["timestamp"].to_numpy() == data.events["timestamp"].to_numpy()).all()
    assert set(_read(out, "user_attributes")["silo"]) == {"0", "1"}
    expected = build_users(data.events, data.items, num_negatives=7, seed=3)
    assert read_split(out / "split.parquet") == expected


def test_core_filter_and_resplit(tmp_path):
    src = pf.write_ml100k_synthetic(tmp_path / "ml", num_users=40, num_items=150)
    out = tmp_path / "out"
    convert("movielens", src, out, ConvertOptions(negatives=4, core=5))
    events = _read(out, "events")
    assert events.groupby("user_id").size().min() >= 5 and events.groupby("item_id").size().min() >= 5
    before = _split(out)
    resplit(out, ConvertOptions(negatives=9, seed=1, core=5))
    after = _split(out)
    assert set(before) == set(after)
    assert all(len(u.test_candidates) == 10 for u in after.values())
    assert json.loads((out / "manifest.json").read_text())["options"]["negatives"] == 9


def test_cli_convert_and_stats(tmp_path, capsys):
    src = pf.write_ml100k_synthetic(tmp_path / "ml", num_users=30, num_items=100)
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", "movielens", str(src), str(out), "--negatives", "5"]) == 0
    printed = capsys.readouterr().out
    assert "30 users" in printed and "100 items" in printed
    assert main(["data", "stats", str(out), "--silos", "2", "--partitioning", "natural",
                 "--partition-by", "occupation"]) == 0
    printed = capsys.readouterr().out
    assert "occupation" in printed and "rate 100%" in printed
    rows = [line for line in printed.splitlines() if line.startswith("│")]
    assert len(rows) == 2
    users = np.array([int(r.split("│")[2]) for r in rows])
    assert users.sum() == 30


def test_generated_ml100k_gives_rating_labels_and_genre_categories(tmp_path):
    """The ablation's MovieLens-format data: publisher layout, and the parts' side data survives."""
    from simulation.ablation import _value
    from simulation.movielens_demo import write_ml100k
    from uirl.config import SiloConfig, from_run_config
    from uirl.data.formats.movielens import ML100K_GENRES
    from uirl.data.silo import load_silo

    raw = write_ml100k(tmp_path / "raw", users=30, movies=60, min_ratings=8, max_ratings=12)
    assert all(len(line.split("|")) == 24 for line in (raw / "u.item").read_bytes().decode("latin-1").splitlines())
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", "movielens", str(raw), str(out), "--negatives", "5"]) == 0
    cfg = from_run_config({"dataset": _value(f"'{out}'"), "partitioning": _value("'iid'"), "facets": 2,
                           "facet-heads": True})
    silo = load_silo(cfg.data, SiloConfig(partition_id=0, num_partitions=1), seed=0)
    labels = {b for u in silo.users for b in u.behaviors}
    assert labels and labels <= {"rate-4", "rate-5"}  # positives only, rating kept as the label
    assert set(silo.item_category.values()) <= set(ML100K_GENRES[1:]) and len(set(silo.item_category.values())) > 5



def test_csv_fields_longer_than_pythons_default_limit_are_read(tmp_path, capsys):
    """Python's csv module stops at 131,072 characters per field by default; a long review, item
    text or a whole-catalogue candidate list is read in full."""
    long_text = "a very long review " * 8_000  # 152,000 characters
    ids = [f"i{k:05d}" for k in range(20_000)]  # a candidate list of them all: 139,999 characters
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"item_id": ids, "text": [long_text] + [f"item {k}" for k in range(1, len(ids))]}).to_csv(
        src / "items.csv", index=False)
    rows = [(f"u{u}", ids[u * 6 + k], 1000 * u + k, long_text if (u, k) == (0, 0) else "") for u in range(4)
            for k in range(6)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "user_text"]).to_csv(src / "events.csv", index=False)
    target = ids[5]  # u0's last event
    negatives = [i for i in ids if i not in ids[:6]]
    (src / "candidates.csv").write_text(f'user_id,split,candidates\nu0,test,"{" ".join([target] + negatives)}"\n')
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", "schema", str(src), str(out), "--negatives", "3"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert _read(out, "items").set_index("item_id").loc["i00000", "text"] == long_text
    assert _read(out, "events")["user_text"].str.len().max() == len(long_text)
    assert len(_split(out)["u0"].test_candidates) == 1 + len(negatives)


def _duplicate_ratings(root):
    src = pf.write_ml100k(root)
    lines = (src / "u.data").read_text().splitlines()
    (src / "u.data").write_text("\n".join(lines + [lines[0], lines[3], lines[0]]) + "\n")
    return "movielens", len(lines), 3


def _duplicate_reviews(root):
    pf.write_amazon2023(root)
    path = root / "All_Beauty.jsonl.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines + lines[:2]) + "\n")
    return "amazon", len(lines), 2


def _duplicate_schema_events(root):
    data = generate(SyntheticSpec(num_users=12, num_items=60, num_silos=1, seed=2))
    root.mkdir(parents=True)
    data.items.to_json(root / "items.jsonl", orient="records", lines=True)
    again = data.events.iloc[[0, 5]]
    rerated = data.events.iloc[[7]].assign(value=9.0)  # same user, item, time and behaviour, another value: kept
    pd.concat([data.events, again, rerated]).to_json(root / "events.jsonl", orient="records", lines=True)
    return "schema", len(data.events) + 1, 2


@pytest.mark.parametrize("case", [_duplicate_ratings, _duplicate_reviews, _duplicate_schema_events],
                         ids=["movielens", "amazon", "schema"])
def test_exact_duplicate_events_are_dropped_with_a_one_line_notice(tmp_path, capsys, case):
    fmt, kept, dropped = case(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", fmt, str(tmp_path / "src"), str(out), "--negatives", "2"]) == 0
    notice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: dropped")]
    assert notice == [f"warning: dropped {dropped} duplicate events (equal to an earlier event in every column: "
                      "user, item, timestamp, behaviour and the rest)"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["events"] == kept == len(_read(out, "events"))
    assert notice[0].removeprefix("warning: ") in manifest["notes"]
    events = _read(out, "events")
    assert not events.duplicated().any()
