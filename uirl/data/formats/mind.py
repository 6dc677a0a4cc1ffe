"""MIND (Microsoft News Dataset) as Microsoft ships it (https://msnews.github.io/), one unzipped
split directory such as ``MINDsmall_train/``:

- ``news.tsv``: news_id, category, subcategory, title, abstract, url, title_entities,
  abstract_entities (tab-separated, UTF-8, no header);
- ``behaviors.tsv``: impression_id, user_id, time (``11/15/2019 8:55:22 AM``), history
  (space-separated news ids clicked before), impressions (``N1-1 N2-0``: shown news, 1 = clicked).

Events: a user's history clicks (``click``, just before their first impression, in history
order), then per impression a ``click`` for each clicked news and a ``view`` for each news shown
but not clicked. The impressions themselves are kept, so the evaluation lists are the dataset's own:
clicked = the target, shown-not-clicked = its negatives, as in the MIND benchmark.
Item text = title + category/subcategory + abstract.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa

from uirl.data.formats.common import Tables, events_table, items_table, require_file, require_items, split_lines
from uirl.errors import DataError

_TIME = "%m/%d/%Y %I:%M:%S %p"


def _seconds(text: str, path: Path, line: int) -> int:
    try:
        return int(dt.datetime.strptime(text.strip(), _TIME).replace(tzinfo=dt.timezone.utc).timestamp())
    except ValueError:
        raise DataError("expected a time like '11/15/2019 8:55:22 AM'", file=str(path), line=line,
                        field="time", value=text) from None


def read(path: Path, *, skip_unknown: bool = False) -> Tables:
    root = path if path.is_dir() else path.parent
    news_path, behaviors_path = require_file(root / "news.tsv"), require_file(root / "behaviors.tsv")
    ids, texts, cats = [], [], []
    for _, f in split_lines(news_path, "\t", 8, encoding="utf-8"):
        title, abstract = f[3].strip(), f[4].strip()
        ids.append(f[0])
        texts.append(". ".join(p for p in (title, f"{f[1]} / {f[2]}", abstract) if p))
        cats.append(f[1] or None)
    require_items(len(ids), news_path, "news article")
    known = set(ids)
    ev: dict[str, list] = {k: [] for k in ("user_id", "item_id", "timestamp", "behavior")}
    imp: dict[str, list] = {k: [] for k in ("user_id", "impression", "timestamp", "item_id", "clicked")}
    history_of: dict[str, tuple[int, list[str]]] = {}  # user -> (first impression time, history)

    def check(news: str, line: int, field: str) -> bool:
        if news in known:
            return True
        if skip_unknown:
            return False
        raise DataError("a news id that is not in news.tsv", file=str(behaviors_path), line=line, field=field,
                        value=news)

    impression_events = []
    for line, f in split_lines(behaviors_path, "\t", 5, encoding="utf-8"):
        user, when = f[1], _seconds(f[2], behaviors_path, line)
        if user not in history_of or when < history_of[user][0]:
            history_of[user] = (when, [n for n in f[3].split() if check(n, line, "history")])
        for shown in f[4].split():
            news, sep, label = shown.rpartition("-")
            if not sep or label not in ("0", "1"):
                raise DataError("expected impressions like 'N1-1 N2-0' (1 = clicked); unlabeled impressions "
                                "(the MIND test split) cannot be evaluated", file=str(behaviors_path), line=line,
                                field="impressions", value=shown)
            if not check(news, line, "impressions"):
                continue
            for key, value in (("user_id", user), ("impression", line), ("timestamp", when), ("item_id", news),
                               ("clicked", label == "1")):
                imp[key].append(value)
            impression_events.append((user, news, when, "click" if label == "1" else "view"))
    if not imp["user_id"]:
        raise DataError("no impressions in the file", file=str(behaviors_path))
    for user, (first, history) in history_of.items():
        for news in history:
            for key, value in zip(ev, (user, news, first - 1, "click")):
                ev[key].append(value)
    for event in impression_events:
        for key, value in zip(ev, event):
            ev[key].append(value)
    impressions = pa.table({"user_id": pa.array(imp["user_id"], pa.string()),
                            "impression": pa.array(imp["impression"], pa.int64()),
                            "timestamp": pa.array(imp["timestamp"], pa.int64()),
                            "item_id": pa.array(imp["item_id"], pa.string()),
                            "clicked": pa.array(imp["clicked"], pa.bool_())})
    return Tables(items=items_table(ids, texts, cats), events=events_table(ev), impressions=impressions)
