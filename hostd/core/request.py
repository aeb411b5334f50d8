"""Request bodies of the local API: bytes in, a checked JSON object out, or a UsageError.

Every socket client is untrusted, so every way a body can be malformed is answered here as
the caller's error (400), never as an internal one: bytes that are not UTF-8, JSON that is
not an object, nesting deeper than `MAX_DEPTH` (measured by a linear scan *before* the
decoder recurses), integers past 64 bits (Python's int parser raises past 4,300 digits),
NaN and infinities, duplicate keys, strings holding NUL or lone surrogates (no path, ref or
log line can take them), and fields the endpoint does not know. The field helpers check
types, and `path` checks what the OS will take (absolute, PATH_MAX, NAME_MAX).

Pure: no I/O, no clock. The async shell (api_local) reads the body under a deadline and
hands the bytes here.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from hostd.errors import UsageError

MAX_DEPTH = 32  # arrays and objects inside each other; our bodies need 2
MAX_INT = 2**63 - 1  # integers are bounded to a signed 64-bit range
MAX_NUMBER_CHARS = 64  # a float's literal: bounds the work of parsing it
PATH_MAX = 4096  # Linux, counting the terminating NUL: a path has at most 4095 bytes
NAME_MAX = 255  # bytes in one path component

# A string literal, possessively (no backtracking), running to the end of the text if it is
# never closed: so one pass strips every string in linear time, even from broken JSON.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # depth step + 1 per bracket
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (exact for valid JSON), without recursion.

    Strings are stripped first (brackets inside them do not count), then the running sum of
    +1 per opening and -1 per closing bracket is taken in C (`accumulate`), not in a Python
    loop, so a megabyte of brackets costs milliseconds.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    steps = brackets.encode("ascii").translate(_OPEN_CLOSE)  # 2 for an opening, 0 a closing
    # prefix sum of (step - 1) at position i is accumulate(steps)[i] - (i + 1)
    depths: map[int] = map(operator.sub, itertools.accumulate(steps), itertools.count(1))
    return max(depths)


def _parse_int(literal: str) -> int:
    # Checked on the literal's length first: int() of a 5,000-digit literal raises
    # ValueError (CPython's int_max_str_digits), and a long one costs quadratic time.
    n = int(literal) if len(literal.lstrip("-")) <= 19 else None
    if n is None or abs(n) > MAX_INT:
        raise UsageError(
            f"request body has an integer out of range ({_excerpt(literal)}); "
            f"integers must lie within ±{MAX_INT}"
        )
    return n


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS or not math.isfinite(f := float(literal)):
        raise UsageError(f"request body has a number out of range ({_excerpt(literal)})")
    return f


def _parse_constant(name: str) -> Any:
    raise UsageError(f"request body has {name}, which is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise UsageError(f"request body has the key {_excerpt(k)!r} twice in one object")
        obj[k] = v
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object,
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_parse_constant,
)


def parse_body(raw: bytes, allowed: Collection[str]) -> dict[str, Any]:
    """The request's JSON object, checked as the module docstring says. An empty body is {}."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"request body is not UTF-8 (byte {e.start} is {raw[e.start]:#04x})"
        ) from e
    if not text.strip():
        return {}
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise UsageError(f"request body nests {depth} deep; at most {MAX_DEPTH} is allowed")
    try:
        body = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:  # the depth check should make this unreachable
        raise UsageError("request body nests too deep") from e
    if not isinstance(body, dict):
        raise UsageError(f"request body must be a JSON object, not {_kind(body)}")
    _check_strings(body)
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise UsageError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    return body


def parse_query(items: Iterable[tuple[str, str]], allowed: Collection[str]) -> dict[str, str]:
    """A URL query's parameters (decoded: `request.query.items()`), each at most once and
    each one of `allowed`: a misspelt one is the caller's error, not a filter left out."""
    params: dict[str, str] = {}
    for key, value in items:
        if key in params:
            raise UsageError(f"query parameter {key!r} given twice")
        params[key] = value
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UsageError(
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    _check_strings(dict(params))
    return params


def _check_strings(body: dict[str, Any]) -> None:
    """Refuse NUL and lone surrogates in any key or string, naming where (no recursion)."""
    todo: list[tuple[str, Any]] = [(repr(k), v) for k, v in body.items()]
    for k in body:
        _check_string(k, "a field name")
    while todo:
        where, v = todo.pop()
        if isinstance(v, str):
            _check_string(v, f"field {where}")
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_string(k, f"a key in field {where}")
                todo.append((f"{where}[{k!r}]", x))
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in enumerate(v))


def _check_string(s: str, where: str) -> None:
    m = _BAD_CHAR.search(s)
    if m is not None:
        what = "a NUL character" if m.group() == "\x00" else "a lone surrogate (not Unicode)"
        raise UsageError(f"{where} holds {what}")


def _kind(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(v), type(v).__name__
    )


def _excerpt(s: str, n: int = 40) -> str:
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} characters)"


# Field helpers: each names the field in its message.


def string(body: Mapping[str, Any], key: str, default: str | None = None) -> str:
    v = body.get(key, default)
    if not isinstance(v, str) or not v:
        raise UsageError(f"field {key!r} must be a non-empty string")
    return v


def opt_string(body: Mapping[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else string(body, key)


def boolean(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if not isinstance(v, bool):
        raise UsageError(f"field {key!r} must be true or false")
    return v


def facts(body: Mapping[str, Any], key: str) -> dict[str, str]:
    v = body.get(key, {})
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise UsageError(f"field {key!r} must be an object of strings")
    return v


def path(body: Mapping[str, Any], key: str) -> Path:
    """An absolute path the OS can take: no NUL, under PATH_MAX, each name under NAME_MAX."""
    s = string(body, key)
    if not s.startswith("/"):
        raise UsageError(f"field {key!r} must be an absolute path, got {_excerpt(s)!r}")
    if "\x00" in s:
        raise UsageError(f"field {key!r} holds a NUL character, which no path can")
    try:
        b = s.encode("utf-8", "surrogateescape")  # as os.fsencode does
    except UnicodeEncodeError as e:
        raise UsageError(f"field {key!r} is not a path the OS can take ({e.reason})") from e
    if len(b) >= PATH_MAX:
        raise UsageError(
            f"field {key!r} is a path of {len(b)} bytes; at most {PATH_MAX - 1} are allowed"
        )
    longest = max(b.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise UsageError(
            f"field {key!r} has a path component of {len(longest)} bytes "
            f"({_excerpt(longest.decode('utf-8', 'replace'))!r}); at most {NAME_MAX} are allowed"
        )
    return Path(s)
