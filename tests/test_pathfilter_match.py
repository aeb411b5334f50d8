"""core/pathfilter.py without regexes over whole names: the same answers as the regex
translation it replaced (kept here as the oracle), in time polynomial in the pattern and the
path, so that no `order` pattern can hold up the daemon's loop."""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from harness import Hostd, request, rmtree, short_tmp
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core import pathfilter
from hostd.core.pathfilter import PathFilter, compile_pattern, load_order

# --- the oracle: the regex translation pathfilter.py used before ---------------------------
# Copied as it was, but for one fix where the old one broke its own rules: a set is written
# `(?!/)[...]` (it was `[...]`, and `[^/...]` when negated). So a range such as `[+-0]` no
# longer matches a `/` ("none of them matches a `/`"), and a negated set's leading `]` or
# `-` is a plain character as in a set that is not negated (`[!]a]` was `[^/]a]`, a set
# closed early; `[!-a]` was `[^/-a]`, a range from `/` to `a`).


def _old_segment(seg: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := _old_class_end(seg, i)) > 0:
            body = seg[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            escaped = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            out.append(f"(?!/)[{'^' if negate else ''}{escaped}]")  # the fix
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _old_class_end(seg: str, start: int) -> int:
    j = start + 1
    if j < len(seg) and seg[j] in "!^":
        j += 1
    if j < len(seg) and seg[j] == "]":
        j += 1
    return seg.find("]", j)


def old_compile(pattern: str) -> re.Pattern[str]:
    """The old compile_pattern: ValueError for its own checks, re.error for a bad range."""
    if not pattern.strip("/"):
        raise ValueError(f"pattern {pattern!r} is empty")
    anchored = "/" in pattern.rstrip("/")
    segs = [s for s in pattern.strip("/").split("/") if s]
    regex = "" if anchored else "(?:[^/]+/)*"
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _old_segment(seg) + ("" if last else "/")
    with warnings.catch_warnings():  # "possible set difference" for `--`: still a range
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(regex, re.DOTALL)


def _self_and_parents(rel: str) -> Iterator[str]:
    while rel:
        yield rel
        rel = rel.rpartition("/")[0]


def old_matches(patterns: Iterable[re.Pattern[str]], rel: str) -> bool:
    return any(p.fullmatch(q) for p in patterns for q in _self_and_parents(rel))


def old_load_order(rels: Sequence[str], patterns: Sequence[str]) -> list[int]:
    compiled = [old_compile(p) for p in patterns]

    def rank(i: int) -> int:
        for n, p in enumerate(compiled):
            if any(p.fullmatch(q) for q in _self_and_parents(rels[i])):
                return n
        return len(compiled)

    return sorted(range(len(rels)), key=rank)


# --- small patterns and paths ---------------------------------------------------------------

_pattern_names = st.one_of(st.just("**"), st.text(alphabet="ab.*?[]!^-", min_size=1, max_size=6))
patterns = st.builds(
    lambda lead, names, trail: lead + "/".join(names) + trail,
    st.sampled_from(["", "", "/"]),
    st.lists(_pattern_names, min_size=1, max_size=4),
    st.sampled_from(["", "", "/"]),
)
# Names a pattern can meet, `*`, `[` and empty ones included (`/a`, `a//b`, `a/`).
_path_names = st.text(alphabet="ab.-[]!*/", max_size=4)
paths = st.builds("/".join, st.lists(_path_names, min_size=1, max_size=5))
# Paths with common directories, as in a tree.
tree_paths = st.builds(
    "/".join, st.lists(st.sampled_from(["a", "b", "ab", "a.b", "", "[a]"]), min_size=1, max_size=4)
)


def compiles(pattern: str) -> re.Pattern[str] | None:
    try:
        return old_compile(pattern)
    except re.error:
        with pytest.raises(ValueError, match="backward range"):
            compile_pattern(pattern)
        return None


@settings(max_examples=1000, deadline=None)
@given(patterns, st.lists(paths, min_size=1, max_size=8))
def test_a_pattern_matches_what_its_old_regex_matched(pattern: str, rels: list[str]) -> None:
    old = compiles(pattern)
    if old is None:
        return
    new = compile_pattern(pattern)
    for rel in rels:
        assert new.fullmatch(rel) is bool(old.fullmatch(rel)), (pattern, rel)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(patterns, max_size=4),
    st.lists(patterns, max_size=4),
    st.lists(st.one_of(paths, tree_paths), min_size=1, max_size=12),
)
def test_a_filter_keeps_what_it_kept(
    include: list[str], exclude: list[str], rels: list[str]
) -> None:
    if any(compiles(p) is None for p in include + exclude):
        return
    f = PathFilter(include, exclude)
    old_in = [old_compile(p) for p in include]
    old_ex = [old_compile(p) for p in exclude]
    for rel in rels:
        includes = not include or old_matches(old_in, rel)
        excludes = old_matches(old_ex, rel)
        assert f.includes(rel) is includes, (include, rel)
        assert f.excludes(rel) is excludes, (exclude, rel)
        assert f.keeps(rel) is (includes and not excludes)


@pytest.mark.parametrize(
    ("remembered", "indexed", "gram"),
    [
        (pathfilter._REMEMBERED, pathfilter._INDEXED, pathfilter._GRAM),
        (2, 0, 1),  # directories forgotten at once; every state's wildcard names by key
        (1, 0, 2),
    ],
)
def test_a_load_order_is_the_one_it_was(remembered: int, indexed: int, gram: int) -> None:
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(patterns, min_size=1, max_size=12),
        st.lists(st.one_of(tree_paths, paths), max_size=25),
    )
    def check(order: list[str], rels: list[str]) -> None:
        if any(compiles(p) is None for p in order):
            return
        assert load_order(rels, order) == old_load_order(rels, order), order

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pathfilter, "_REMEMBERED", remembered)
        mp.setattr(pathfilter, "_INDEXED", indexed)
        mp.setattr(pathfilter, "_GRAM", gram)
        check()


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("[]a]", "]", True),  # a leading `]` is in the set
        ("[!]a]", "b", True),
        ("[!]a]", "]", False),
        ("[^a-c]x", "dx", True),
        ("[!-a]", "b", True),  # `-` first: a plain `-`
        ("[!-a]", "-", False),
        ("[a-]", "-", True),
        ("[+-0]", "+", True),
        ("a[+-0]b", "a/b", False),  # a set never matches a `/`
        ("[ab", "[ab", True),  # not closed: a plain `[`
        ("a*b*c", "axxbyyc", True),
        ("a*b*c", "acb", False),
        ("a**b", "ab", True),  # `**` inside a name is `*`
        ("**", "", True),
        ("a/**", "a", False),  # below a: a/x (keeps() counts a/ itself through the parent)
        ("a/**", "a/", True),
        ("**/b", "b", True),
        ("*", "/a", False),  # no empty directory names before an unanchored pattern
        ("/a//b/", "a/b", True),
    ],
)
def test_sets_and_stars(pattern: str, path: str, matches: bool) -> None:
    assert compile_pattern(pattern).fullmatch(path) is matches
    old = old_compile(pattern)
    assert bool(old.fullmatch(path)) is matches


def test_bad_patterns_are_told_as_before() -> None:
    for bad, message in [
        ("/", "is empty"),
        ("//", "is empty"),
        ("a" * 1025, "is longer than 1024"),
        ("a\0b", "holds a NUL byte"),
        ("[b-a]", "backward range b-a"),  # was re.error, which callers did not catch
    ]:
        with pytest.raises(ValueError, match=message):
            compile_pattern(bad)
    with pytest.raises(ValueError, match="more than 256"):
        PathFilter(["a"] * 200, ["b"] * 57)


# --- what the old regexes took seconds or hours over -----------------------------------------
# The one place a timing bound is the point of a test: each of these took the old regexes
# from seconds (the first: ~17 s per name) to far longer; a polynomial matcher takes
# milliseconds. 2 s leaves room for a slow, busy machine.
ATTACKS = [
    ("*?" * 13 + "#", "model-00001-of-00004.safetensors"),
    ("*a" * 30 + "b", "a" * 250),
    ("*?" * 400 + "#", "?" * 255),
    ("/".join(["**"] * 300) + "/x", "/".join(["a"] * 2000)),
    ("/".join(["**", "*"] * 150) + "/x", "/".join(["a"] * 2000)),
    ("*[a-z]?" * 100 + "!", "ab" * 120),
]


@pytest.mark.parametrize(("pattern", "path"), ATTACKS)
def test_a_pathological_pattern_takes_no_time(pattern: str, path: str) -> None:
    start = time.monotonic()
    assert not compile_pattern(pattern).fullmatch(path)
    rels = [path, f"{path}/y", f"d/{path}", *(f"{path}{i}" for i in range(50))]
    assert load_order(rels, [pattern] * 4) == list(range(len(rels)))
    assert PathFilter(exclude=[pattern]).keeps(path)
    assert time.monotonic() - start < 2.0


def test_many_patterns_over_many_paths_take_little_time() -> None:
    # The old regexes: ~70 s for these (every path and parent against every pattern).
    rels = [f"s{i // 1000:03d}/sub{i % 10}/model-{i:05d}-of-20000.bin" for i in range(20_000)]
    literal = [rels[i * 77] for i in range(256)]
    wild = [f"*-{i * 77:05d}-of-*" for i in range(256)]
    start = time.monotonic()
    assert load_order(rels, literal)[:3] == [0, 77, 154]
    assert load_order(rels, wild)[:3] == [0, 77, 154]
    assert time.monotonic() - start < 5.0  # about 0.3 s here; generous for a busy machine


# --- the daemon -----------------------------------------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("pm")
    try:
        yield root
    finally:
        rmtree(root)


def test_a_restore_ordered_by_a_pathological_pattern_holds_nobody_up(work: Path) -> None:
    src = work / "src"
    src.mkdir()
    for i in range(1, 5):
        (src / f"model-0000{i}-of-00004.safetensors").write_bytes(b"w" * 1000 * i)
    with Hostd(work / "d") as h:
        h.publish(src, "m/weights")
        out: dict[str, Any] = {}
        body = {"order": ["*?" * 13 + "#", "*?" * 14 + "#"], "progressive": True}

        def run() -> None:
            try:
                out.update(h.restore("m/weights", work / "out", **body))
            except BaseException as e:
                out["error"] = e

        restore = threading.Thread(target=run, daemon=True)
        restore.start()
        deadline = time.monotonic() + 30
        while restore.is_alive() and time.monotonic() < deadline:
            # The old regexes held the loop ~17 s per file name and pattern: no answer.
            status, _ = request(h.socket, "GET", "/v1/status", timeout=5)
            assert status == 200
            restore.join(0.05)
        assert not restore.is_alive()
    assert out["event"] == "result", out
    assert sorted(p.name for p in (work / "out").iterdir()) == sorted(p.name for p in src.iterdir())


def test_a_load_order_built_to_be_slow_is_refused_or_kept_off_the_loop(work: Path) -> None:
    """Patterns of many `?*` pieces cost their length for every path: 256 of 1,023
    characters held the event loop 17 s over 1,000 files (every request waited), and, past
    1,024 files, kept a worker thread busy after its caller had gone. Past ORDER_WORK the
    restore is refused, saying why; below it the work runs on a thread while the daemon
    answers."""
    src = work / "src"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:04d}.safetensors").write_bytes(b"w")
    slow = "?*" * 510 + "?"
    with Hostd(work / "d") as h:
        h.publish(src, "m/many")
        got = h.restore(
            "m/many", work / "out", order=[f"{slow}{i:02x}" for i in range(256)], progressive=True
        )
        assert got["event"] == "error", got
        assert "more matching than a load order gets" in got["message"], got
        assert not (work / "out").exists()
        out: dict[str, Any] = {}
        body = {"order": [f"{slow}{i:02x}" for i in range(60)], "progressive": True}

        def run() -> None:
            try:
                out.update(h.restore("m/many", work / "out2", **body))
            except BaseException as e:
                out["error"] = e

        restore = threading.Thread(target=run, daemon=True)
        restore.start()
        worst = 0.0
        while restore.is_alive():
            started = time.monotonic()
            status, _ = request(h.socket, "GET", "/v1/snapshots", timeout=30)
            worst = max(worst, time.monotonic() - started)
            assert status == 200
            restore.join(0.05)
        assert out["event"] == "result", out
        assert worst < 1.0, f"the loop answered in {worst:.2f} s at worst"
