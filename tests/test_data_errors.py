"""Bad input: one clear error naming the file (and line), exit status 2, no directory that looks done."""

from __future__ import annotations

import gzip

import pytest

import publisher_files as pf
from uirl.cli import main
from uirl.config import SiloConfig, from_run_config
from uirl.data import convert as convert_module
from uirl.data.convert import ConvertOptions, convert
from uirl.data.silo import load_silo
from uirl.errors import ConfigError, DataError


def _replace_line(path, number, text, encoding="latin-1"):
    lines = path.read_bytes().decode(encoding).splitlines()
    lines[number - 1] = text
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def _ml100k(root):
    return pf.write_ml100k(root)


def _missing_item_file(root):
    (_ml100k(root) / "u.item").unlink()
    return "movielens", r"u\.item: file not found"


def _wrong_separator(root):
    path = _ml100k(root) / "u.data"
    path.write_text(path.read_text().replace("\t", ","))
    return "movielens", r"u\.data line 1.*separated by '\\t', found 1 \(wrong separator"


def _csv_wrong_separator(root):
    path = pf.write_ml_latest(root) / "ratings.csv"
    path.write_text(path.read_text().replace(",", ";"))
    return "movielens", r"ratings\.csv line 1.*expected the header 'userId,movieId,rating,timestamp'"


def _damaged_line(root):
    path = _ml100k(root) / "u.data"
    _replace_line(path, 4, "196\t4")
    return "movielens", r"u\.data line 4: expected 4 fields"


def _truncated_gzip(root):
    pf.write_amazon2018(root)
    path = root / "Books_5.json.gz"
    path.write_bytes(path.read_bytes()[:-30])
    return "amazon", r"Books_5\.json\.gz: truncated or corrupt gzip file after line"


def _not_utf8_csv(root):
    path = pf.write_ml_latest(root) / "movies.csv"
    path.write_bytes(path.read_bytes().replace("Misérables".encode("utf-8"), "Misérables".encode("latin-1")))
    return "movielens", r"movies\.csv line 4: byte 0xe9 at column 8 is not valid UTF-8"


def _not_utf8_mind(root):
    path = pf.write_mind(root) / "news.tsv"
    path.write_bytes(path.read_bytes().replace(b"Chili's", b"Chili\x92s"))
    return "mind", r"news\.tsv line 8: byte 0x92"


def _rating_out_of_range(root):
    _replace_line(_ml100k(root) / "u.data", 3, "196\t3\t6\t881250951")
    return "movielens", r"u\.data line 3, field 'rating' = 6\.0: expected a value in \[1, 5\]"


def _csv_rating_out_of_range(root):
    path = pf.write_ml_latest(root) / "ratings.csv"
    path.write_text(path.read_text().replace("1,73,5.0,", "1,73,5.5,"))
    return "movielens", r"ratings\.csv line 4, field 'rating' = 5\.5"


def _amazon_rating_out_of_range(root):
    pf.write_amazon2023(root)
    path = root / "All_Beauty.jsonl.gz"
    text = gzip.open(path, "rt").read().replace('"rating": 3.0', '"rating": 30.0', 1)
    with gzip.open(path, "wt") as f:
        f.write(text)
    return "amazon", r"All_Beauty\.jsonl\.gz line 6, field 'rating' = 30\.0: expected a star rating"


def _unknown_movie(root):
    _replace_line(_ml100k(root) / "u.data", 2, "196\t999\t4\t881250950")
    return "movielens", r"u\.data line 2, field 'movie' = 999: a rating of a movie that is not in the movies file"


def _unknown_asin(root):
    pf.write_amazon2018(root)
    path = root / "meta_Books.json.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines[1:]) + "\n")  # the first asin loses its metadata
    return "amazon", r"Books_5\.json\.gz line 1, field 'asin' = '0000092878': a review of an item that is not in meta_Books"


def _unknown_news(root):
    path = pf.write_mind(root) / "behaviors.tsv"
    path.write_text(path.read_text().replace("N59295-1", "N99999-1"))
    return "mind", r"behaviors\.tsv line 2, field 'impressions' = 'N99999': a news id that is not in news\.tsv"


def _bad_json(root):
    pf.write_amazon2023(root)
    with gzip.open(root / "All_Beauty.jsonl.gz", "at") as f:
        f.write('{"rating": 5.0, "user_id": \n')
    return "amazon", r"All_Beauty\.jsonl\.gz line 10: not valid JSON"


def _long_field_then_damaged_line(root):
    path = pf.write_ml_latest(root) / "movies.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(2, f'2,"{"Jumanji " * 20_000}(1995)",Adventure')  # 160,000 characters: over csv's default limit
    lines.append("99,Broken")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return "movielens", rf"movies\.csv line {len(lines)}: expected 3 fields separated by ','"


def _empty_item_file(root):
    (_ml100k(root) / "u.item").write_bytes(b"")
    return "movielens", r"u\.item: the item file is empty \(expected one movie per line\)"


def _empty_ml1m_movies(root):
    (pf.write_ml1m(root) / "movies.dat").write_bytes(b"\n")
    return "movielens", r"movies\.dat: the item file is empty"


def _csv_movies_header_only(root):
    (pf.write_ml_latest(root) / "movies.csv").write_text("movieId,title,genres\n")
    return "movielens", r"movies\.csv: the item file is empty"


def _empty_news(root):
    (pf.write_mind(root) / "news.tsv").write_text("")
    return "mind", r"news\.tsv: the item file is empty \(expected one news article per line\)"


def _empty_amazon_meta(root):
    pf.write_amazon2018(root)
    with gzip.open(root / "meta_Books.json.gz", "wt"):
        pass
    return "amazon", r"meta_Books\.json\.gz: the item file is empty \(expected one product per line\)"


def _schema_items_header_only(root):
    root.mkdir(parents=True)
    (root / "items.csv").write_text("item_id,text\n")
    (root / "events.csv").write_text("user_id,item_id\nu1,i1\n")
    return "schema", r"items\.csv: the item file is empty \(expected one item per row\)"


CASES = [_missing_item_file, _wrong_separator, _csv_wrong_separator, _damaged_line, _truncated_gzip, _not_utf8_csv,
         _not_utf8_mind, _rating_out_of_range, _csv_rating_out_of_range, _amazon_rating_out_of_range, _unknown_movie,
         _unknown_asin, _unknown_news, _bad_json, _empty_item_file, _empty_ml1m_movies, _csv_movies_header_only,
         _empty_news, _empty_amazon_meta, _schema_items_header_only,
         _long_field_then_damaged_line]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_left_behind(tmp_path, capsys, case):
    fmt, pattern = case(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        convert(fmt, tmp_path / "src", out, ConvertOptions(negatives=2))
    assert main(["data", "convert", "--format", fmt, str(tmp_path / "src"), str(out), "--negatives", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uirl: ") and "Traceback" not in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("silos", ["0", "-2"])
def test_data_stats_with_fewer_than_one_silo_is_an_argument_error(tmp_path, capsys, silos):
    out = tmp_path / "ml"
    convert("movielens", pf.write_ml100k(tmp_path / "src"), out, ConvertOptions(negatives=2))
    assert main(["data", "stats", str(out), "--silos", silos]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"uirl: field '--silos' = {silos}: expected an integer >= 1 (the number "
                                        "of silos)"] and "Traceback" not in err


def test_unknown_items_can_be_skipped_on_request(tmp_path):
    _unknown_asin(tmp_path / "src")
    manifest = convert("amazon", tmp_path / "src", tmp_path / "out",
                       ConvertOptions(negatives=2, skip_unknown_items=True))
    assert manifest["counts"]["events"] == 7  # 9 reviews, 2 of them of the item without metadata


def test_a_failure_while_writing_leaves_no_output_directory(tmp_path, monkeypatch):
    src = pf.write_ml100k(tmp_path / "src")
    real = convert_module._write

    def failing(table, path):
        if path.name == "split.parquet":
            raise OSError("disk full")
        real(table, path)

    monkeypatch.setattr(convert_module, "_write", failing)
    with pytest.raises(OSError):
        convert("movielens", src, tmp_path / "out", ConvertOptions(negatives=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_output_is_never_overwritten(tmp_path):
    src = pf.write_ml100k(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        convert("movielens", src, out, ConvertOptions(negatives=2))
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_dataset_path_or_partitioning_names_the_run_config_key(tmp_path):
    silo = SiloConfig(partition_id=0, num_partitions=2)
    cfg = from_run_config({"dataset": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"field 'dataset' = '.*nope': does not exist"):
        load_silo(cfg.data, silo, seed=0)
    with pytest.raises(ConfigError, match="field 'partitioning' = 'random'"):
        from_run_config({"partitioning": "random"})
    with pytest.raises(ConfigError, match="field 'dirichlet-alpha'"):
        from_run_config({"dirichlet-alpha": 0.0})
    out = tmp_path / "ml"
    convert("movielens", pf.write_ml100k_synthetic(tmp_path / "src", num_users=20, num_items=80), out,
            ConvertOptions(negatives=3))
    cfg = from_run_config({"dataset": str(out), "partitioning": "natural", "partition-by": "shoe-size"})
    with pytest.raises(ConfigError, match=r"field 'partition-by' = 'shoe-size'.*occupation"):
        load_silo(cfg.data, silo, seed=0)


def test_an_empty_silo_is_an_error(tmp_path):
    out = tmp_path / "ml"
    convert("movielens", pf.write_ml100k(tmp_path / "src"), out, ConvertOptions(negatives=2))
    cfg = from_run_config({"dataset": str(out), "partitioning": "iid"})
    with pytest.raises(DataError, match="2 users cannot fill 3 silos"):
        load_silo(cfg.data, SiloConfig(partition_id=0, num_partitions=3), seed=0)
    # Two silos of one user each: user 186 has too few positives to be evaluated -> an empty silo.
    silos = [SiloConfig(partition_id=i, num_partitions=2) for i in range(2)]
    with pytest.raises(DataError, match="silo has no user with enough positive events"):
        for silo in silos:
            load_silo(cfg.data, silo, seed=0)
