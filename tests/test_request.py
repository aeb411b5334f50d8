"""The pure request-body parser (hostd/core/request.py): every malformed body is a UsageError
that names the problem, and every well-formed one comes back as it was sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.core import request as rq
from hostd.errors import UsageError

ALLOWED = {"ref", "target", "compat", "replace", "n"}


def refused(raw: bytes | str, allowed: set[str] = ALLOWED) -> str:
    with pytest.raises(UsageError) as e:
        rq.parse_body(raw.encode() if isinstance(raw, str) else raw, allowed)
    assert e.value.status == 400
    return e.value.message


def test_a_good_body_comes_back() -> None:
    body = {"ref": "m/v", "target": "/t", "compat": {"torch": "2.5"}, "replace": True, "n": 3}
    assert rq.parse_body(json.dumps(body).encode(), ALLOWED) == body


@pytest.mark.parametrize("raw", [b"", b"  \r\n\t "])
def test_an_empty_body_is_no_fields(raw: bytes) -> None:
    assert rq.parse_body(raw, ALLOWED) == {}


def test_bytes_that_are_not_utf8() -> None:
    assert "not UTF-8 (byte 9 is 0xff)" in refused(b'{"ref": "\xff"}')
    assert "not UTF-8" in refused(b'{"ref": "\xed\xa0\x80"}')  # an encoded surrogate
    assert "not UTF-8" in refused(b"\xc3")  # a truncated sequence


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("[]", "an array"), ('"x"', "a string"), ("3", "a number"), ("null", "null")],
)
def test_a_body_that_is_not_an_object(raw: str, kind: str) -> None:
    assert refused(raw) == f"request body must be a JSON object, not {kind}"


@pytest.mark.parametrize("raw", ["{", '{"ref": }', '{"ref": "x",}', "{'ref': 1}", "\ufeff{}"])
def test_bad_json(raw: str) -> None:
    assert refused(raw).startswith("request body is not valid JSON")


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_nesting_is_refused_before_decoding(depth: int) -> None:
    raw = '{"n": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    assert refused(raw) == f"request body nests {depth} deep; at most 32 is allowed"
    # unbalanced: the decoder never sees it either
    assert "nests" in refused("[" * depth)


def test_nesting_up_to_the_limit_is_fine() -> None:
    raw = '{"n": ' + "[" * 31 + "]" * 31 + "}"
    assert rq.parse_body(raw.encode(), ALLOWED)["n"] == json.loads("[" * 31 + "]" * 31)


def test_brackets_inside_strings_do_not_count() -> None:
    s = "[{" * 100 + '\\"[' * 50
    assert rq.nesting_depth(json.dumps({"ref": s})) == 1
    assert rq.parse_body(json.dumps({"ref": s}).encode(), ALLOWED) == {"ref": s}


def test_depth_scan_is_linear_on_hostile_input() -> None:
    # an unclosed string full of escaped quotes: a naive string regex is quadratic on it
    assert rq.nesting_depth('"' + '\\"' * 300_000) == 0
    assert rq.nesting_depth("[]" * 300_000) == 1


# any text but NUL and lone surrogates, which no body may hold (tested below)
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63) + 1, 2**63 - 1) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=30,
)


def reference_depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max(map(reference_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(reference_depth, v.values()), default=0)
    return 0


@given(json_values)
def test_nesting_depth_matches_the_structure(v: Any) -> None:
    assert rq.nesting_depth(json.dumps(v)) == reference_depth(v)
    assert rq.nesting_depth(json.dumps(v, ensure_ascii=False, indent=1)) == reference_depth(v)


@given(st.dictionaries(st.sampled_from(sorted(ALLOWED)), json_values))
def test_well_formed_bodies_round_trip(body: dict[str, Any]) -> None:
    assert rq.parse_body(json.dumps(body, ensure_ascii=False).encode(), ALLOWED) == body
    assert rq.parse_body(json.dumps(body).encode(), ALLOWED) == body


@pytest.mark.parametrize(
    "literal",
    ["9" * 5000, "-" + "9" * 5000, str(2**63), str(-(2**63)), "1" + "0" * 19],
)
def test_huge_integers(literal: str) -> None:
    assert "integer out of range" in refused('{"n": ' + literal + "}")


def test_integers_within_64_bits() -> None:
    for n in (2**63 - 1, -(2**63) + 1, 0, -1):
        assert rq.parse_body(b'{"n": %d}' % n, ALLOWED) == {"n": n}


@pytest.mark.parametrize("literal", ["1e999", "-1e400", "0." + "1" * 100, "1" * 70 + ".5"])
def test_huge_floats(literal: str) -> None:
    assert "number out of range" in refused('{"n": ' + literal + "}")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_numbers(constant: str) -> None:
    assert refused('{"n": ' + constant + "}") == (
        f"request body has {constant}, which is not a JSON number"
    )


def test_duplicate_keys() -> None:
    assert refused('{"ref": "a", "ref": "b"}') == (
        "request body has the key 'ref' twice in one object"
    )
    assert "key 'x' twice" in refused('{"compat": {"x": "1", "y": "2", "x": "1"}}')
    assert "twice" in refused('{"n": [{"a": 1, "a": 1}]}')


def test_nul_and_lone_surrogates_in_strings() -> None:
    assert refused(r'{"ref": "a\u0000b"}') == "field 'ref' holds a NUL character"
    assert refused(r'{"compat": {"k": "\u0000"}}') == ("field 'compat'['k'] holds a NUL character")
    assert refused(r'{"compat": {"\u0000": "v"}}') == (
        "a key in field 'compat' holds a NUL character"
    )
    assert refused(r'{"n": ["ok", "\ud800"]}') == (
        "field 'n'[1] holds a lone surrogate (not Unicode)"
    )
    assert refused(r'{"\u0000": 1}').endswith("holds a NUL character")
    # a paired surrogate escape is just a character
    assert rq.parse_body(rb'{"ref": "\ud83d\ude00"}', ALLOWED) == {"ref": "\U0001f600"}


def test_unknown_fields_are_named() -> None:
    assert refused('{"ref": "x", "zz": 1, "aa": 2}') == (
        "unknown field(s) 'aa', 'zz'; allowed: compat, n, ref, replace, target"
    )
    assert refused('{"x": 1}', set()) == "unknown field(s) 'x'; allowed: none"


def test_query_parameters_are_known_and_given_once() -> None:
    assert rq.parse_query([("prefix", "m/")], {"prefix"}) == {"prefix": "m/"}
    assert rq.parse_query([], {"prefix"}) == {}
    with pytest.raises(UsageError, match=r"^unknown query parameter\(s\) 'a', 'z'; allowed: p$"):
        rq.parse_query([("z", "1"), ("p", ""), ("a", "2")], {"p"})
    with pytest.raises(UsageError, match=r"^query parameter 'p' given twice$"):
        rq.parse_query([("p", "1"), ("p", "1")], {"p"})
    with pytest.raises(UsageError, match="NUL"):
        rq.parse_query([("p", "a\x00b")], {"p"})


# field helpers


def test_string_fields() -> None:
    assert rq.string({"ref": "a"}, "ref") == "a"
    assert rq.string({}, "mode", "auto") == "auto"
    for bad in ({}, {"ref": ""}, {"ref": 3}, {"ref": None}, {"ref": ["a"]}):
        with pytest.raises(UsageError, match="field 'ref' must be a non-empty string"):
            rq.string(bad, "ref")
    assert rq.opt_string({"tier": None}, "tier") is None
    assert rq.opt_string({"tier": "mem"}, "tier") == "mem"


def test_bool_and_facts_fields() -> None:
    assert rq.boolean({}, "replace") is False
    assert rq.boolean({"replace": True}, "replace") is True
    for bad in (0, 1, "true", None):
        with pytest.raises(UsageError, match="field 'replace' must be true or false"):
            rq.boolean({"replace": bad}, "replace")
    assert rq.facts({"compat": {"a": "b"}}, "compat") == {"a": "b"}
    assert rq.facts({}, "compat") == {}
    bad_facts: list[Any] = [[], "x", {"a": 1}, {"a": None}, {"a": ["b"]}]
    for bad in bad_facts:
        with pytest.raises(UsageError, match="field 'compat' must be an object of strings"):
            rq.facts({"compat": bad}, "compat")


def test_paths() -> None:
    assert rq.path({"target": "/models/llama"}, "target") == Path("/models/llama")
    longest = "/" + "/".join(["n" * 255] * 15) + "/" + "x" * 254  # 4095 bytes
    assert len(longest) == 4095
    assert rq.path({"target": longest}, "target") == Path(longest)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("models", "field 'target' must be an absolute path, got 'models'"),
        ("./m", "field 'target' must be an absolute path, got './m'"),
        ("", "field 'target' must be a non-empty string"),
        ("/a\x00b", "field 'target' holds a NUL character, which no path can"),
        ("/" + "a" * 4095, "field 'target' is a path of 4096 bytes; at most 4095 are allowed"),
        ("/é" * 2048, "field 'target' is a path of 6144 bytes; at most 4095 are allowed"),
        ("/x/" + "a" * 256 + "/y", "field 'target' has a path component of 256 bytes"),
        ("/" + "é" * 128, "field 'target' has a path component of 256 bytes"),
        ("/\ud800", "field 'target' is not a path the OS can take"),
    ],
)
def test_paths_the_os_cannot_take(value: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        rq.path({"target": value}, "target")
    assert e.value.message.startswith(message)
