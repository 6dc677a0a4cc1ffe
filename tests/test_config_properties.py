"""Properties of the run-config parser (:mod:`uirl.config`) and of ``--run-config`` text
(:mod:`uirl.launch.run_config`), checked on generated input: a valid assignment round-trips, and
anything else is one :class:`~uirl.errors.ConfigError` naming the key -- never another exception."""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from uirl.config import _KEYS, LEVELS, VIEWS, from_run_config, silo_from_node_config, to_run_config
from uirl.errors import ConfigError
from uirl.launch.run_config import format_overrides, parse_overrides

#: Small and quick: the whole file runs in about ten seconds on two cores; no example database is
#: written. A whole run config (75 keys) takes longer to generate: fewer of those.
PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
WHOLE_CONFIGS = settings(PROPERTY, max_examples=40)

#: Valid values of the string keys that take one of a few words.
_WORDS = {"strategy": ["fedavg"], "aggregation": ["fedavg", "median", "trimmed-mean"], "central-dp": ["", "fixed"],
          "compression": ["none", "fp16", "int8"], "pooling": ["auto", "mean", "last"], "train-mode": ["lora", "cached"],
          "facet-score": ["max", "attention"], "partitioning": ["auto", "iid", "natural", "dirichlet"],
          "accountant": ["rdp", "prv"], "device": ["auto", "cpu", "cuda", "cuda:1"]}
#: Numeric keys whose valid range is not covered by the generic ones below.
_NUMBERS = {"synthetic-users": st.integers(10, 10**6), "synthetic-items": st.integers(50, 10**6),
            "max-tokens": st.integers(4, 512), "facets": st.integers(1, 64), "image-dim": st.integers(1, 4096),
            "user-proj-rank": st.integers(0, 64), "item-proj-rank": st.integers(0, 64),
            "eval-min-users": st.integers(1, 50), "eval-max-users": st.one_of(st.just(0), st.integers(50, 10**6)),
            "seed": st.integers(-(2**63), 2**63), "min-nodes": st.integers(2, 1000),
            "popularity-noise-shares": st.integers(1, 8),
            "prior-weight": st.floats(-1e6, 1e6), "target-epsilon": st.floats(1e-3, 1e3),
            "node-wait-timeout": st.floats(1e-3, 1e6), "lr": st.floats(1e-8, 10.0), "temperature": st.floats(1e-3, 1e3)}
_TEXT = st.text(max_size=12)


def _sublist(names: tuple[str, ...], must: str) -> st.SearchStrategy[str]:
    """A comma-separated list of some of ``names``, always with ``must``, in any order."""
    return st.lists(st.sampled_from(names), unique=True).map(
        lambda chosen: ",".join(dict.fromkeys([*chosen, must]) if must else chosen))


def _valid_value(key: str, default) -> st.SearchStrategy:
    if key in _WORDS:
        return st.sampled_from(_WORDS[key])
    if key in _NUMBERS:
        return _NUMBERS[key]
    if key == "views":
        return _sublist(VIEWS, "behavior")
    if key == "levels":
        return st.one_of(st.just(""), _sublist(LEVELS, "long"))
    if key == "dataset":
        return st.one_of(st.just("synthetic"), _TEXT.filter(str.strip))
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(1, 10**6)
    if default is None:  # `auto` or a number
        return st.one_of(st.just("auto"), st.floats(1e-3, 0.49))
    if isinstance(default, float):  # (0, 0.49] is inside every float key's range
        return st.floats(1e-3, 0.49)
    return _TEXT  # free text: paths, names


@st.composite
def valid_run_configs(draw) -> dict:
    """A value for every declared key, within its range and consistent with the others."""
    values = {key: draw(_valid_value(key, f.default)) for key, (_, f) in _KEYS.items()}
    if values["secagg"]:  # what SecAgg+ rules out (see FederationConfig)
        values.update({"central-dp": "", "compression": "none", "aggregation": "fedavg"})
        values["dp"] = values["dp"] or values["popularity-prior"]
    if values["central-dp"]:
        values["aggregation"] = "fedavg"
    if values["popularity-prior"] and values["secagg"]:  # distributed noise: at most min-nodes shares
        values["popularity-noise-shares"] = min(values["popularity-noise-shares"], values["min-nodes"])
    else:
        values["popularity-noise-shares"] = 1
    values["local-prior"] = values["local-prior"] and values["popularity-prior"]
    return values


@WHOLE_CONFIGS
@given(valid_run_configs())
def test_a_valid_run_config_parses_and_round_trips(values):
    cfg = from_run_config(values)
    assert to_run_config(cfg) == values
    assert from_run_config(to_run_config(cfg)) == cfg
    # ... and through the --run-config text the wrappers hand to `flwr run`, which cannot carry a
    # string with a double quote and a single quote (or a control character): that one is named.
    try:
        text = format_overrides(to_run_config(cfg))
    except ConfigError as error:
        bad = values[error.field]
        assert '"' in bad and ("'" in bad or any(c < " " and c != "\t" or c == "\x7f" for c in bad))
        return
    assert from_run_config(parse_overrides(text)) == cfg


#: Keys that no run config declares: anything but the declared ones.
_UNDECLARED = st.text(min_size=1, max_size=20).filter(lambda k: k not in _KEYS)


@WHOLE_CONFIGS
@given(valid_run_configs(), _UNDECLARED, st.one_of(st.booleans(), st.integers(), st.floats(), _TEXT))
def test_an_undeclared_key_is_refused_naming_it(values, key, value):
    with pytest.raises(ConfigError) as caught:
        from_run_config({**values, key: value})
    assert caught.value.field == key and "unknown run-config key" in str(caught.value)
    assert "\n" not in str(caught.value)


#: Any scalar a run config (or a TOML file of overrides) can hold, plus lists, tables and None.
_ANY = st.one_of(st.booleans(), st.integers(), st.integers(-(10**400), 10**400), st.floats(), _TEXT,
                 st.sampled_from(["true", "False", "auto", "nan", "inf", "1e999", "", " ", "0x10", "1_000"]),
                 st.lists(st.integers(), max_size=2), st.dictionaries(_TEXT, st.integers(), max_size=1), st.none())
#: A cross-key check names the key that has to change with the one given (views with image need image-dim).
_NAMED_WITH = {"views": {"image-dim"}}


@PROPERTY
@given(st.sampled_from(sorted(_KEYS)), _ANY)
@example("lr", 10**400)  # float() of it overflows
@example("seed", 10**5000)  # more digits than repr() writes: the message still shows something
@example("lr", 10**5000)
@example("dp", [True])
@example("noise-multiplier", "Auto ")
def test_any_value_for_a_key_is_taken_or_refused_naming_the_key(key, value):
    """Wrong type, out of range, not finite, a list: one ConfigError that names the key (never a
    TypeError/ValueError/OverflowError); a value that is taken lands in the key's field."""
    try:
        cfg = from_run_config({key: value})
    except ConfigError as error:
        assert error.field == key or error.field in _NAMED_WITH.get(key, ()), (key, value, str(error))
        assert "\n" not in str(error) and str(error).startswith(f"field {error.field!r}")
        return
    section, f = _KEYS[key]
    taken = getattr(getattr(cfg, section), f.name)
    assert taken is None or type(taken) is type(f.default) or (f.default is None and type(taken) is float)
    assert to_run_config(cfg)[key] == ("auto" if taken is None else taken)
    if isinstance(taken, float):
        assert math.isfinite(taken)


_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
_PIECES = st.lists(st.one_of(st.sampled_from(sorted(_KEYS)), st.sampled_from(["=", "'", '"', " ", "[", "]", "{", "}",
                                                                               "\n", "\t", ",", "1", "1.5", "e9",
                                                                               "true", "auto", "x"])),
                   max_size=12).map("".join)


@PROPERTY
@given(st.one_of(_ANY_TEXT, _PIECES))
@example("lr=1" + "0" * 5000)  # more digits than Python turns into an int
@example("lr=1" + "0" * 400)  # an int too large for a float
@example("x=" + "[" * 3000 + "]" * 3000)  # nested deeper than the TOML parser recurses
@example("lr=1979-05-27 dataset={a=1} seed=[1,2]")
@example("lr=0.1 dp")
def test_any_run_config_text_parses_or_is_one_config_error(text):
    """Whatever ``--run-config`` says, the wrappers answer with a Config or one ConfigError line."""
    try:
        from_run_config(parse_overrides(text))
    except ConfigError as error:
        assert "\n" not in str(error)


_WORD = st.text(string.ascii_letters + string.digits + "-_.:/'\"[]{}", min_size=1, max_size=10)


@WHOLE_CONFIGS
@given(valid_run_configs(), _WORD.filter(lambda t: "=" not in t), st.integers(0, 100))
def test_a_token_without_equals_is_refused(values, token, where):
    """A bare word among the pairs (Flower would drop it without a word) is refused, named."""
    pairs = format_overrides({k: values[k] for k in ("lr", "dp", "seed", "accountant")}).split(" ")
    pairs.insert(where % (len(pairs) + 1), token)
    with pytest.raises(ConfigError, match="expected space-separated key=value pairs") as caught:
        parse_overrides(" ".join(pairs))
    assert caught.value.value == token


@PROPERTY
@given(st.dictionaries(st.sampled_from(["partition-id", "num-partitions", "target-epsilon", "ledger-path",
                                        "data-path"]), _ANY))
@example({"partition-id": 0, "num-partitions": 2, "target-epsilon": 10**400})  # float() of it overflows
def test_any_node_config_gives_a_silo_or_one_config_error(node_config):
    try:
        silo = silo_from_node_config(node_config)
    except ConfigError as error:
        assert "\n" not in str(error) and error.field in node_config.keys() | {"partition-id", "num-partitions"}
        return
    assert 0 <= silo.partition_id < silo.num_partitions
    assert silo.target_epsilon is None or (math.isfinite(silo.target_epsilon) and silo.target_epsilon > 0)
