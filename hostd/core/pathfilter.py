"""Publish filters: which entries of a tree a publish keeps (`--exclude`, `--include`).

A pattern is a glob on an entry's path relative to the published directory, names joined by
`/`:
- `*` matches any run of characters within one name, `?` one character, `[abc]` / `[!abc]`
  one of a set; none of them matches a `/`. `**` as a whole name matches any number of
  directories, none included (`a/**/b`: `a/b`, `a/x/b`, `a/x/y/b`).
- A pattern without a `/` matches a name at any depth (`*.pyc`, `__pycache__`); one with a
  `/` matches from the top of the tree (`logs/*.txt`, `/notes.md`). A trailing `/` is
  dropped.
- A pattern that matches a directory matches everything below it.

An entry that matches an exclude is left out (a directory is then not read at all). With
includes, only entries that match one of them are kept (directories are read to find them).
An exclude wins over an include.

Pure: no I/O. The helper that walks a publish source (fsops.py, standard library only)
applies it, so it imports nothing but `re`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MAX_PATTERNS = 256
MAX_PATTERN_LEN = 1024


def _segment(seg: str) -> str:
    """One name of a pattern as a regex: `*`, `?` and `[...]` stay within the name."""
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := _class_end(seg, i)) > 0:
            body = seg[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            escaped = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            out.append(f"[{'^/' if negate else ''}{escaped}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_end(seg: str, start: int) -> int:
    """Where the `[...]` set opened at `start` closes, or -1 (then `[` is a plain `[`)."""
    j = start + 1
    if j < len(seg) and seg[j] in "!^":
        j += 1
    if j < len(seg) and seg[j] == "]":  # a leading `]` is part of the set
        j += 1
    end = seg.find("]", j)
    return end


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A pattern as a regex matched against whole relative paths. ValueError if it is bad."""
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError(f"pattern {pattern!r} is empty")
    if len(pattern) > MAX_PATTERN_LEN:
        raise ValueError(f"pattern {pattern[:40]!r}... is longer than {MAX_PATTERN_LEN}")
    if "\0" in pattern:
        raise ValueError(f"pattern {pattern!r} holds a NUL byte")
    anchored = "/" in pattern.rstrip("/")
    segs = [s for s in pattern.strip("/").split("/") if s]
    regex = "" if anchored else "(?:[^/]+/)*"
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _segment(seg) + ("" if last else "/")
    return re.compile(regex, re.DOTALL)


class PathFilter:
    """The publish's `include` and `exclude` patterns, compiled once."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        if len(include) + len(exclude) > MAX_PATTERNS:
            raise ValueError(f"more than {MAX_PATTERNS} include and exclude patterns")
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self._include = [compile_pattern(p) for p in self.include]
        self._exclude = [compile_pattern(p) for p in self.exclude]

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)}, exclude={list(self.exclude)})"

    @property
    def empty(self) -> bool:
        return not self.include and not self.exclude

    def excludes(self, rel: str) -> bool:
        """Whether `rel` or a directory above it matches an exclude."""
        return any(_matches(self._exclude, p) for p in _self_and_parents(rel))

    def includes(self, rel: str) -> bool:
        """Whether `rel` is wanted by the includes: there are none, or it or a directory
        above it matches one."""
        if not self._include:
            return True
        return any(_matches(self._include, p) for p in _self_and_parents(rel))

    def keeps(self, rel: str) -> bool:
        return self.includes(rel) and not self.excludes(rel)


def _matches(patterns: Iterable[re.Pattern[str]], rel: str) -> bool:
    return any(p.fullmatch(rel) for p in patterns)


def _self_and_parents(rel: str) -> Iterable[str]:
    while rel:
        yield rel
        rel = rel.rpartition("/")[0]


def load_order(rels: Sequence[str], patterns: Sequence[str]) -> list[int]:
    """The indices of `rels` in a load order (a progressive restore's `order`): those the
    first pattern matches (a path, or a glob as above), then the second's, ..., then the
    rest; each group in its given order."""
    compiled = [compile_pattern(p) for p in patterns]

    def rank(i: int) -> int:
        for n, p in enumerate(compiled):
            if any(p.fullmatch(q) for q in _self_and_parents(rels[i])):
                return n
        return len(compiled)

    return sorted(range(len(rels)), key=rank) if compiled else list(range(len(rels)))
