"""Schema validation, the synthetic generator, and the evaluation split."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from uirl.data import (CLUSTERS, TOPICS, SyntheticSpec, UserData, build_users, generate, load_candidates,
                       positive_mask, sample_training_example, save_candidates, touched_items,
                       validate_events, validate_items)
from uirl.data.synthetic import GENERIC_ADJECTIVES, GENERIC_NOUNS, STYLES
from uirl.errors import ConfigError, DataError

SMALL = SyntheticSpec(num_users=120, num_items=300, seed=3)


@pytest.fixture(scope="module")
def data():
    return generate(SMALL)


# --- generator -----------------------------------------------------------------------------------

def test_generate_is_deterministic_by_seed(data):
    again = generate(SMALL)
    pd.testing.assert_frame_equal(data.items, again.items)
    pd.testing.assert_frame_equal(data.events, again.events)
    other = generate(SyntheticSpec(num_users=120, num_items=300, seed=4))
    assert not data.items["text"].equals(other.items["text"])
    assert not data.events["item_id"].equals(other.events["item_id"])


def test_generated_data_passes_validation(data):
    items = validate_items(data.items)
    events = validate_events(data.events, items)
    assert len(events) == len(data.events)
    assert events["timestamp"].dtype == np.int64
    assert set(events["silo"]) == {str(s) for s in range(SMALL.num_silos)}
    per_user = events.groupby("user_id").size()
    assert per_user.min() >= SMALL.min_events and per_user.max() <= SMALL.max_events
    assert not events.duplicated(["user_id", "item_id"]).any()  # no item twice for a user
    for _, g in events.groupby("user_id"):
        assert g["timestamp"].is_monotonic_increasing and g["timestamp"].is_unique


_MARKERS = {style: re.compile("|".join(rf"(?<![\w-]){re.escape(m)}(?![\w-])" for m in markers))
            for style, markers in STYLES.items()}


def _styles_in(text: str) -> list[str]:
    """The styles whose markers occur in ``text`` (as whole words or phrases)."""
    return [style for style, pattern in _MARKERS.items() if pattern.search(text.lower())]


def test_item_texts_are_short_titles_of_topic_words_and_one_style(data):
    for text, category in zip(data.items["text"], data.items["category"]):
        words = text.replace(",", "").replace(":", "").lower().split()
        assert 7 <= len(words) <= 12, text
        assert sum(w in TOPICS[category] for w in words) >= 2, text
        assert len(_styles_in(text)) == 1, text
    style = pd.Series([_styles_in(t)[0] for t in data.items["text"]])
    counts = style.value_counts()
    assert set(counts.index) == set(STYLES) and counts.max() - counts.min() <= 1  # balanced
    per_topic = pd.crosstab(data.items["category"].to_numpy(), style.to_numpy())
    assert (per_topic.max(axis=1) - per_topic.min(axis=1)).max() <= 1  # and within every topic


def test_topic_words_are_distinct_and_clusters_cover_topics():
    words = [w for ws in TOPICS.values() for w in ws]
    assert len(words) == len(set(words))
    assert sorted(t for c in CLUSTERS for t in c) == sorted(TOPICS)


def test_style_markers_are_distinct_and_not_topic_or_generic_words():
    markers = [m for ms in STYLES.values() for m in ms]
    assert len(STYLES) == 6 and len(markers) == len(set(markers))
    other = {w for ws in TOPICS.values() for w in ws} | set(GENERIC_ADJECTIVES) | set(GENERIC_NOUNS)
    for style, ms in STYLES.items():
        for m in ms:
            assert [s for s, pattern in _MARKERS.items() if pattern.search(m)] == [style], m
            assert not set(m.split()) & other, m


def _main_style_share(spec: SyntheticSpec) -> float:
    """Mean over users of the share of their events whose item has the user's most frequent style."""
    d = generate(spec)
    style = dict(zip(d.items["item_id"], (_styles_in(t)[0] for t in d.items["text"])))
    per_user = d.events.assign(style=d.events["item_id"].map(style)).groupby("user_id")["style"]
    return float(per_user.agg(lambda s: s.value_counts(normalize=True).iloc[0]).mean())


def test_users_mostly_pick_their_preferred_style():
    preferred = _main_style_share(SyntheticSpec(num_users=200, seed=5))
    neutral = _main_style_share(SyntheticSpec(num_users=200, style_strength=1 / 6, seed=5))
    # Default style_strength 0.8 (a little less in practice: favoured items run out); with six equally
    # liked styles the most frequent one is chance, 1/6 plus the noise of ~20 draws.
    assert preferred > 0.6 and neutral < 0.4
    assert preferred > neutral + 0.3


def _silo_spread(spec: SyntheticSpec) -> float:
    """Mean total-variation distance of each silo's category distribution from the overall one."""
    d = generate(spec)
    cat = d.events["item_id"].map(dict(zip(d.items["item_id"], d.items["category"])))
    table = pd.crosstab(d.events["silo"], cat, normalize="index")
    overall = cat.value_counts(normalize=True).reindex(table.columns)
    return float((table - overall).abs().sum(axis=1).mean() / 2)


def test_silos_are_non_iid():
    skewed = _silo_spread(SyntheticSpec(num_users=300, silo_skew=0.3, seed=1))
    iid = _silo_spread(SyntheticSpec(num_users=300, silo_skew=1000.0, seed=1))
    assert iid < 0.1
    assert skewed > 2 * iid and skewed > 0.15


def test_like_and_purchase_depend_on_affinity():
    d = generate(SyntheticSpec(seed=2))
    ev = d.events.assign(category=d.events["item_id"].map(dict(zip(d.items["item_id"], d.items["category"]))))
    # Empirical affinity: the share of the user's events in the event's category.
    share = ev.groupby(["user_id", "category"])["item_id"].transform("size") / \
        ev.groupby("user_id")["item_id"].transform("size")
    engaged = ev["behavior"].isin(["like", "purchase"])
    viewed = ev["behavior"] == "view"
    high, low = share >= 0.25, share <= 0.1
    assert high.sum() > 500 and low.sum() > 200
    assert engaged[high].mean() > engaged[low].mean() + 0.1
    assert viewed[high].mean() < viewed[low].mean()


@pytest.mark.parametrize("field, value", [("num_users", 0), ("num_silos", 0), ("min_events", 0),
                                          ("max_events", 2), ("num_items", 5), ("silo_skew", 0.0),
                                          ("seed", -1), ("num_users", 2.5), ("style_strength", 1.5),
                                          ("style_strength", -0.1), ("style_strength", float("nan")),
                                          ("style_strength", "high")])
def test_spec_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SyntheticSpec(**{"min_events": 3, field: value})


# --- schema --------------------------------------------------------------------------------------

def _items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x y", "y z", "z w"]})


def _events(**override) -> pd.DataFrame:
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"],
                       "timestamp": [10, 20, 30], "behavior": ["click", "like", "view"]})
    for col, (row, value) in override.items():
        df[col] = df[col].astype(object)
        df.loc[row, col] = value
    return df


@pytest.mark.parametrize("override, field, shown", [
    ({"timestamp": (1, "abc")}, "timestamp", "'abc'"),
    ({"timestamp": (2, 1.5)}, "timestamp", "1.5"),
    ({"timestamp": (1, None)}, "timestamp", "missing"),
    ({"behavior": (2, "teleport")}, "behavior", "'teleport'"),
    ({"item_id": (1, "zzz")}, "item_id", "'zzz'"),
    ({"user_id": (2, "  ")}, "user_id", "'  '"),
    ({"user_id": (0, None)}, "user_id", "missing"),
])
def test_event_validation_errors_name_row_field_and_value(override, field, shown):
    (row, _), = override.values()
    with pytest.raises(DataError) as info:
        validate_events(_events(**override), _items(), source="events.jsonl")
    message = str(info.value)
    assert message.startswith(f"events.jsonl row {row}, field '{field}'")
    assert shown in message and "expected" in message
    assert info.value.field == field and info.value.row == row


def test_event_validation_missing_column_and_bad_value():
    with pytest.raises(DataError, match="field 'behavior'.*missing required column"):
        validate_events(_events().drop(columns="behavior"), _items())
    bad = _events().assign(value=[1.0, np.inf, np.nan])
    with pytest.raises(DataError, match=r"row 1, field 'value' = inf: expected a finite number"):
        validate_events(bad, _items())
    with pytest.raises(DataError, match=r"field 'value' = 'five': expected a number"):
        validate_events(_events().assign(value=[1.0, "five", None]), _items())


def test_item_validation_errors():
    with pytest.raises(DataError, match=r"items row 2, field 'item_id' = 'a': expected a unique item_id"):
        validate_items(pd.DataFrame({"item_id": ["a", "b", "a"], "text": ["x", "y", "z"]}))
    with pytest.raises(DataError, match=r"items row 1, field 'text' = '': expected a non-empty string"):
        validate_items(pd.DataFrame({"item_id": ["a", "b"], "text": ["x", ""]}))
    with pytest.raises(DataError, match=r"field 'text'.*missing required column"):
        validate_items(pd.DataFrame({"item_id": ["a"]}))


def test_validation_cleans_types():
    events = validate_events(_events().assign(timestamp=["10", 20.0, 30], behavior=["Click", "like ", "VIEW"]),
                             _items())
    assert events["timestamp"].tolist() == [10, 20, 30] and events["timestamp"].dtype == np.int64
    assert events["behavior"].tolist() == ["click", "like", "view"]
    assert isinstance(events["user_id"].dtype, pd.StringDtype)


def test_positive_mask():
    ev = pd.DataFrame({"behavior": ["click", "view", "rate", "rate", "rate", "purchase"],
                       "value": [np.nan, np.nan, 4.0, 3.5, np.nan, np.nan]})
    assert positive_mask(ev).tolist() == [True, False, True, False, False, True]
    assert positive_mask(ev, rating_threshold=3.0).tolist() == [True, False, True, True, False, True]


# --- split ---------------------------------------------------------------------------------------

def _catalogue(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"i{k:02d}" for k in range(n)], "text": [f"text {k}" for k in range(n)]})


def test_split_orders_by_time_with_ties_in_file_order():
    events = pd.DataFrame({
        "user_id": ["u", "u", "u", "u", "u", "u", "u", "v"],
        "item_id": ["i05", "i03", "i04", "i01", "i02", "i06", "i03", "i07"],
        "timestamp": [50, 30, 30, 10, 20, 60, 70, 1],
        "behavior": ["click", "like", "click", "purchase", "view", "rate", "click", "click"],
        "value": [np.nan, np.nan, np.nan, np.nan, np.nan, 2.0, np.nan, np.nan],
    })
    users = build_users(events, _catalogue(), num_negatives=5, seed=0)
    assert [u.user_id for u in users] == ["u"]  # v has one positive; i02 view and i06 low rating drop
    u = users[0]
    # positives by time: i01(10) i03(30) i04(30, after i03 in the file) i05(50) [i03 again at 70: repeat]
    assert u.train_items == ("i01", "i03") and u.valid_target == "i04" and u.test_target == "i05"
    assert u.valid_history(1) == ("i03",) and u.test_history(2) == ("i03", "i04")


def test_negatives_never_touched_fixed_and_independent_of_other_users(data):
    users = build_users(data.events, data.items, num_negatives=19, seed=7)
    touched = touched_items(data.events)
    assert users == sorted(users, key=lambda u: u.user_id) and len(users) > 100
    for u in users:
        for target, cands in ((u.valid_target, u.valid_candidates), (u.test_target, u.test_candidates)):
            assert cands[0] == target and len(cands) == 20 and len(set(cands)) == 20
            assert not set(cands[1:]) & touched[u.user_id]
    assert users == build_users(data.events, data.items, num_negatives=19, seed=7)
    assert users != build_users(data.events, data.items, num_negatives=19, seed=8)
    subset = data.events[data.events["silo"] == "1"]  # other users absent, index not 0..n-1
    by_id = {u.user_id: u for u in users}
    sub_users = build_users(subset, data.items, num_negatives=19, seed=7)
    assert sub_users and all(by_id[u.user_id] == u for u in sub_users)
    assert any(u.valid_candidates[1:] != u.test_candidates[1:] for u in users)


def test_negatives_need_a_large_enough_catalogue():
    events = pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["i00", "i01", "i02", "i03"],
                           "timestamp": [1, 2, 3, 4], "behavior": ["click"] * 4})
    assert build_users(events, _catalogue(8), num_negatives=4, seed=0)
    with pytest.raises(DataError, match="catalogue too small"):
        build_users(events, _catalogue(8), num_negatives=5, seed=0)


def test_sample_training_example(data):
    users = build_users(data.events, data.items, num_negatives=9, seed=0)
    touched = touched_items(data.events)
    all_ids = data.items["item_id"].tolist()
    rng = np.random.default_rng(0)
    for u in users[:50]:
        history, cands = sample_training_example(u, max_history=4, num_negatives=5, rng=rng,
                                                 all_item_ids=all_ids, touched=touched[u.user_id])
        t = u.train_items.index(cands[0])
        assert t >= 1 and history == u.train_items[max(0, t - 4):t]
        assert len(cands) == 6 and len(set(cands)) == 6 and not set(cands[1:]) & touched[u.user_id]
    short = UserData("s", ("i00",), "i01", "i02", ("i01", "i03"), ("i02", "i03"))
    with pytest.raises(ValueError):
        sample_training_example(short, max_history=4, num_negatives=1, rng=rng, all_item_ids=all_ids,
                                touched=frozenset())


def test_candidates_round_trip(tmp_path, data):
    users = build_users(data.events, data.items, num_negatives=9, seed=0)
    path = tmp_path / "candidates.jsonl"
    save_candidates(users, path)
    assert load_candidates(path) == users
    assert [p.name for p in tmp_path.iterdir()] == ["candidates.jsonl"]  # no temp file left
    record = json.loads(path.read_text().splitlines()[0])
    record["test_candidates"] = record["test_candidates"][1:]  # target no longer first
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"row {len(users)}"):
        load_candidates(path)
