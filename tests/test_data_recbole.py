"""Public benchmarks in: sequence-only schema files, fixed candidate lists, RecBole atomic files."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from helpers import tiny_config
from uirl.cli import main
from uirl.config import DataConfig, SiloConfig
from uirl.data.convert import ConvertOptions, convert, resplit
from uirl.data.fixed_split import read_split
from uirl.data.silo import load_silo
from uirl.errors import DataError
from uirl.federated import _worker, local_evaluate
from uirl.model.build import build_model

ITEMS = [f"i{k}" for k in range(1, 16)]
# File order is time order: u1 = i1..i6, u2 = i7 i8 i9 i1 i2, interleaved.
EVENTS = [("u1", "i1"), ("u2", "i7"), ("u1", "i2"), ("u1", "i3"), ("u2", "i8"), ("u1", "i4"), ("u2", "i9"),
          ("u1", "i5"), ("u2", "i1"), ("u2", "i2"), ("u1", "i6")]
TEST_U1 = ["i6", "i12", "i13", "i14", "i15"]
VALID_U1 = ["i5", "i10", "i11"]
TEST_U2 = ["i2", "i14"]


def _schema_dir(root, *, candidates=None):
    root.mkdir(parents=True)
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for item in ITEMS:
            f.write(json.dumps({"item_id": item, "text": f"news story {item}"}) + "\n")
    (root / "events.csv").write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in EVENTS), encoding="utf-8")
    if candidates is not None:
        with open(root / "candidates.jsonl", "w", encoding="utf-8") as f:
            for user, split, ids in candidates:
                f.write(json.dumps({"user_id": user, "split": split, "candidates": ids}) + "\n")
    return root


def _split(out):
    return {u.user_id: u for u in read_split(out / "split.parquet")}


def test_schema_events_without_timestamp_or_behavior_keep_file_order(tmp_path):
    out = tmp_path / "out"
    manifest = convert("schema", _schema_dir(tmp_path / "src"), out, ConvertOptions(negatives=3))
    assert manifest["event-order"] == "file" and manifest["counts"]["behaviors"] == {"click": len(EVENTS)}
    events = pq.read_table(out / "events.parquet").to_pandas()
    assert events["timestamp"].tolist() == list(range(len(EVENTS)))  # the position in the file
    users = _split(out)
    assert users["u1"].train_items == ("i1", "i2", "i3", "i4") and users["u1"].test_target == "i6"
    assert (users["u2"].train_items, users["u2"].valid_target, users["u2"].test_target) == (("i7", "i8", "i9"), "i1",
                                                                                              "i2")
    assert len(users["u1"].test_candidates) == 4


def test_schema_fixed_candidate_lists_are_used_verbatim_and_a_silo_evaluates_on_them(tmp_path, tiny_bert):
    src = _schema_dir(tmp_path / "src", candidates=[("u1", "test", TEST_U1), ("u1", "valid", VALID_U1),
                                                     ("u2", "test", TEST_U2)])
    out = tmp_path / "out"
    manifest = convert("schema", src, out, ConvertOptions(negatives=3))
    assert manifest["fixed-lists"] == {"file": "candidates.jsonl", "test": 2, "valid": 1}
    users = _split(out)
    assert list(users["u1"].test_candidates) == TEST_U1 and list(users["u1"].valid_candidates) == VALID_U1
    assert list(users["u2"].test_candidates) == TEST_U2
    assert len(users["u2"].valid_candidates) == 4  # no row in the file: sampled (3 negatives)
    silo = load_silo(DataConfig(dataset=str(out), partitioning="iid"), SiloConfig(partition_id=0, num_partitions=1),
                     seed=0)
    assert {u.user_id: list(u.test_candidates) for u in silo.eval_users} == {"u1": TEST_U1, "u2": TEST_U2}
    cfg = tiny_config(tiny_bert, **{"dataset": str(out), "partitioning": "iid", "eval-min-users": 1})  # 2 users
    one = SiloConfig(partition_id=0, num_partitions=1)
    assert [list(u.test_candidates) for u in _worker(cfg, one)[1].eval_users] == [TEST_U1, TEST_U2]
    model, _ = build_model(cfg)
    metrics = local_evaluate(cfg, one, {k: v.numpy().copy() for k, v in model.adapter_state().items()})
    assert metrics["num-examples"] == 2 and 0.0 <= metrics["auc"] <= 1.0
    # New sampled lists keep the file's lists.
    resplit(out, ConvertOptions(negatives=5, seed=1))
    users = _split(out)
    assert list(users["u1"].test_candidates) == TEST_U1 and len(users["u2"].valid_candidates) == 6


INTER_GENERAL = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "1\t10\t5\t881250951\n1\t11\t4\t881250949\n1\t12\t3\t881250952\n1\t13\t4\t881250953\n"
                 "1\t14\t5\t881250954\n1\t15\t4\t881250950\n2\t10\t4\t881250955\n")
ITEM_FILE = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
             "10\tToy Story\t1995\tAnimation Children's Comedy\n11\tGoldenEye\t1995\tAction Adventure Thriller\n"
             "12\tFour Rooms\t1995\tThriller\n13\tGet Shorty\t1995\tAction Comedy Drama\n"
             "14\tCopycat\t1995\tCrime Drama Mystery Thriller\n"
             + "".join(f"{k}\tMovie {k}\t1996\tDrama\n" for k in range(16, 24)))


def test_recbole_general_layout_ratings_times_and_item_text(tmp_path, capsys):
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "ml-100k.inter").write_text(INTER_GENERAL, encoding="utf-8")
    (src / "ml-100k.item").write_text(ITEM_FILE, encoding="utf-8")
    (src / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\n1\t24\tM\n2\t53\tF\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", "recbole", str(src), str(out), "--negatives", "3"]) == 0
    printed = capsys.readouterr().out
    assert "warning: items without text in ml-100k.item (no row, or no text field): 1" in printed and "'15'" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["event-order"] == "timestamp" and manifest["counts"]["behaviors"] == {"rate": 7}
    assert manifest["notes"] and "'15'" in manifest["notes"][0]
    assert pq.read_table(out / "user_attributes.parquet").to_pydict()["gender"] == ["M", "F"]  # for partition-by
    items = pq.read_table(out / "items.parquet").to_pandas().set_index("item_id")
    assert items.loc["10", "text"] == "Toy Story. Genres: Animation, Children's, Comedy"
    assert items.loc["10", "category"] == "Animation" and items.loc["15", "text"] == "15"
    user = _split(out)["1"]
    # Time order 11, 15, 10, 12 (a 3: not positive), 13, 14.
    assert user.train_items == ("11", "15", "10") and (user.valid_target, user.test_target) == ("13", "14")
    # Stricter threshold: only the two 5s are positive -> nobody has 4 positives.
    with pytest.raises(DataError, match="enough positive events"):
        convert("recbole", src / "ml-100k.inter", tmp_path / "strict", ConvertOptions(negatives=3,
                                                                                      positive_threshold=5))


def test_recbole_general_layout_without_rating_or_time_and_without_item_file(tmp_path):
    inter = tmp_path / "tiny.inter"
    inter.write_text("user_id:token\titem_id:token\n" + "".join(f"u\t{i}\n" for i in "dcbae") + "v\tf\nv\tg\n",
                     encoding="utf-8")
    out = tmp_path / "out"
    manifest = convert("recbole", inter, out, ConvertOptions(negatives=1))
    assert manifest["event-order"] == "file" and manifest["counts"]["behaviors"] == {"click": 7}
    assert "no tiny.item" in manifest["notes"][0]
    user = _split(out)["u"]
    assert user.train_items == ("d", "c", "b") and (user.valid_target, user.test_target) == ("a", "e")


SEQ_HEADER = "session_id:token\titem_id_list:token_seq\titem_id:token\n"


def test_recbole_sequential_layout_is_chained_into_each_users_sequence(tmp_path):
    src = tmp_path / "seq"
    src.mkdir()
    rows = [("1", "10", "11"), ("2", "20", "21"), ("1", "10 11", "12"), ("1", "10 11 12", "13"),
            ("2", "20 21", "22"), ("2", "21 22", "23"),  # histories cut to a window of 2
            ("1", "10 11", "12"),  # a row restating part of the sequence
            ("2", "22 23", "24"), ("1", "10 11 12 13", "14"), ("1", "10 11 12 13 14", "10")]  # 10 again: a repeat
    (src / "seq.inter").write_text(SEQ_HEADER + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    (src / "seq.item").write_text("item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\n"
                                  + "".join(f"{k}\tThing {k}\tAcme\tHome Garden\n" for k in range(10, 30)),
                                  encoding="utf-8")
    out = tmp_path / "out"
    manifest = convert("recbole", src, out, ConvertOptions(negatives=3))
    assert manifest["event-order"] == "file" and "notes" not in manifest
    events = pq.read_table(out / "events.parquet").to_pandas()
    per_user = events.sort_values("timestamp").groupby("user_id")["item_id"].apply(list).to_dict()
    assert per_user == {"1": ["10", "11", "12", "13", "14", "10"], "2": ["20", "21", "22", "23", "24"]}
    items = pq.read_table(out / "items.parquet").to_pandas().set_index("item_id")
    assert items.loc["12", "text"] == "Thing 12. Brand: Acme. Categories: Home, Garden"
    users = _split(out)
    # A repeated item counts at its first positive: user 1's distinct positives are 10..14.
    assert users["1"].train_items == ("10", "11", "12") and users["1"].test_target == "14"
    assert users["2"].train_items == ("20", "21", "22") and users["2"].test_target == "24"


def test_recbole_benchmark_split_files_are_read_in_train_valid_test_order(tmp_path):
    src = tmp_path / "bench"
    src.mkdir()
    train = "".join(f"u\t{' '.join(map(str, range(1, k + 1)))}\t{k + 1}\n" for k in range(1, 4))
    for name, body in (("train", train), ("valid", "u\t1 2 3 4\t5\n"), ("test", "u\t1 2 3 4 5\t6\n")):
        (src / f"bench.{name}.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n" + body,
                                                 encoding="utf-8")
    books = "".join(f"{k}\tbook {k}\n" for k in range(1, 12))
    (src / "bench.item").write_text("item_id:token\tname:token_seq\n" + books, encoding="utf-8")
    out = tmp_path / "out"
    convert("recbole", src, out, ConvertOptions(negatives=2))
    user = _split(out)["u"]
    assert user.train_items == ("1", "2", "3", "4") and (user.valid_target, user.test_target) == ("5", "6")


def _missing_header_type(root):
    root.mkdir()
    (root / "d.inter").write_text("user_id:token\titem_id\n1\t2\n", encoding="utf-8")
    return "recbole", r"d\.inter line 1, field 'item_id'.*expected a name:type header field"


def _wrong_field_count(root):
    root.mkdir()
    (root / "d.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\n1\t4\t7\n",
                                  encoding="utf-8")
    return "recbole", r"d\.inter line 3 = .*: expected 3 fields separated by '\\t', found 2"


def _inconsistent_sequence(root):
    root.mkdir()
    (root / "d.inter").write_text(SEQ_HEADER + "1\t10\t11\n1\t10 11\t12\n1\t10 99\t13\n", encoding="utf-8")
    return "recbole", (r"d\.inter line 4, field 'item_id_list' = '10 99': rows of session_id '1' disagree.*"
                       r"d\.inter line 3")


def _unknown_candidate(root):
    _schema_dir(root, candidates=[("u1", "test", ["i6", "i404"])])
    return "schema", r"candidates\.jsonl line 1, field 'candidates' = 'i404': an item id that is not in the items"


def _candidate_not_the_held_out_item(root):
    _schema_dir(root, candidates=[("u1", "test", TEST_U1), ("u2", "valid", ["i2", "i3"])])
    return "schema", r"candidates\.jsonl line 2, field 'candidates' = 'i2': the first candidate must be .* 'i1'"


def _candidate_csv_duplicate(root):
    _schema_dir(root)
    (root / "candidates.csv").write_text("user_id,split,candidates\nu1,test,i6 i7 i7\n", encoding="utf-8")
    return "schema", r"candidates\.csv line 2, field 'candidates' = 'i7': an item id that appears twice"


def _candidate_single(root):
    _schema_dir(root, candidates=[("u1", "test", ["i6"])])
    return "schema", r"candidates\.jsonl line 1, field 'candidates'.*at least 2 ids"


CASES = [_missing_header_type, _wrong_field_count, _inconsistent_sequence, _unknown_candidate,
         _candidate_not_the_held_out_item, _candidate_csv_duplicate, _candidate_single]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_benchmark_input_is_one_clear_error_and_nothing_is_left_behind(tmp_path, capsys, case):
    fmt, pattern = case(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        convert(fmt, tmp_path / "src", out, ConvertOptions(negatives=1))
    assert main(["data", "convert", "--format", fmt, str(tmp_path / "src"), str(out), "--negatives", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uirl: ") and "Traceback" not in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
