"""Publish filters and load orders: which paths a glob pattern matches (a publish's
`--exclude` and `--include`, a progressive restore's `order`).

A pattern is a glob on an entry's path relative to the published directory, names joined by
`/`:
- `*` matches any run of characters within one name, `?` one character, `[abc]` / `[!abc]`
  one of a set (`[a-z]` a range; a `]` or `-` first is in the set); none of them matches a
  `/`. `**` as a whole name matches any number of directories, none included (`a/**/b`:
  `a/b`, `a/x/b`, `a/x/y/b`).
- A pattern without a `/` matches a name at any depth (`*.pyc`, `__pycache__`); one with a
  `/` matches from the top of the tree (`logs/*.txt`, `/notes.md`). A trailing `/` is
  dropped.
- A pattern that matches a directory matches everything below it.

An entry that matches an exclude is left out (a directory is then not read at all). With
includes, only entries that match one of them are kept (directories are read to find them).
An exclude wins over an include.

How it matches, and what it must not do: `order` patterns come from any caller allowed to
restore and are matched in the root daemon's event loop, so no pattern may take more than
polynomial time. No backtracking regex over a whole name or path, then (one for
`*?*?*?*?*?*?*?*?*?*?*?*?*?#` takes seconds per name, and each `*?` more doubles it).
- A name pattern is cut at its `*`s into pieces of fixed width (literal characters, `?`,
  sets); it matches a name when its first piece matches at the start, its last at the end,
  and each other one at its leftmost place after the one before (leftmost is never worse):
  O(len(name) * len(pattern)). A piece with `?` or a set is a regex without repeats or
  alternatives, which cannot backtrack.
- A path is matched name by name, keeping the set of positions in the pattern that the names
  so far can reach (a bit mask); `**` is a position that stays on any non-empty name:
  O(names * pattern names) name matches.
- A list of patterns (`PathFilter`, `load_order`) steps those sets once per directory, not
  once per path and parent, and finds the patterns a name can move with one dict look-up
  (the literal names) and a test of each wildcard name pattern that could match: with many,
  only those whose key (4 characters of a literal piece) the name holds.

Pure: no I/O. The helper that walks a publish source (fsops.py, standard library only)
applies it, so it imports nothing but the standard library.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

MAX_PATTERNS = 256
MAX_PATTERN_LEN = 1024
_REMEMBERED = 1024  # directories a _Ranker keeps; its callers go through a tree in order
_GRAM = 4  # characters in a row of a wildcard name's literal part: its key
_INDEXED = 8  # live wildcard names past which a state finds the ones to try by their keys


class _Piece:
    """A run of a name pattern without `*`: characters that each match one character."""

    __slots__ = ("_rx", "size", "text")

    def __init__(self, text: str, rx: str | None, size: int) -> None:
        self.size = size
        self.text = text if rx is None else None  # the literal characters, if that is all
        self._rx = None if rx is None else re.compile(rx, re.DOTALL)

    def at(self, name: str, pos: int) -> bool:
        """Whether it matches `name` at `pos`."""
        if self._rx is None:
            return name.startswith(self.text or "", pos)
        return self._rx.match(name, pos) is not None

    def find(self, name: str, pos: int, end: int) -> int:
        """Where its leftmost match in `name[pos:end]` ends, or -1."""
        if self._rx is None:
            i = name.find(self.text or "", pos, end)
            return i if i < 0 else i + self.size
        m = self._rx.search(name, pos, end)
        return -1 if m is None else m.end()


class _Name:
    """A name pattern with a wildcard, cut into pieces at its `*`s: `match(name)`, and the
    `needles` every name it matches holds (its literal pieces)."""

    __slots__ = ("match", "needles", "text")

    def __init__(self, text: str, pieces: list[_Piece]) -> None:
        self.text = text
        texts = [p.text for p in pieces]
        self.needles = [t for t in texts if t]
        self.match: Callable[[str], bool]
        if len(pieces) == 1:  # no `*`
            self.match = _exact(pieces[0])
        elif None in texts:
            self.match = _pieces(pieces[0], [p for p in pieces[1:-1] if p.size], pieces[-1])
        else:  # only literals and `*`s (`*.json`, `model-*`): str methods alone
            self.match = _literals([t or "" for t in texts])

    def __repr__(self) -> str:
        return f"_Name({self.text!r})"


def _exact(piece: _Piece) -> Callable[[str], bool]:
    return lambda name: len(name) == piece.size and piece.at(name, 0)


def _literals(texts: list[str]) -> Callable[[str], bool]:
    head, *mids, tail = texts
    mids = [t for t in mids if t]  # `**` inside a name is one `*`
    size = len(head) + len(tail)
    if not mids:
        return lambda name: len(name) >= size and name.startswith(head) and name.endswith(tail)

    def match(name: str) -> bool:
        end = len(name) - len(tail)
        if end < len(head) or not name.startswith(head) or not name.endswith(tail):
            return False
        pos = len(head)
        for text in mids:  # each at its leftmost place: that leaves the most room
            pos = name.find(text, pos, end)
            if pos < 0:
                return False
            pos += len(text)
        return True

    return match


def _pieces(head: _Piece, mids: list[_Piece], tail: _Piece) -> Callable[[str], bool]:
    def match(name: str) -> bool:
        end = len(name) - tail.size
        if end < head.size or not head.at(name, 0) or not tail.at(name, end):
            return False
        pos = head.size
        for piece in mids:  # as in _literals
            pos = piece.find(name, pos, end)
            if pos < 0:
                return False
        return True

    return match


def _name(seg: str, pattern: str) -> str | _Name:
    """One name of a pattern: itself if it has no wildcard. `*`, `?` and `[...]` stay
    within the name; a `[` that is not closed is a plain `[`."""
    pieces: list[_Piece] = []
    text: list[str] = []  # the current piece's characters, if all literal
    rx: list[str] = []  # the current piece as a regex, one character each
    plain = True
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            pieces.append(_Piece("".join(text), None if plain else "".join(rx), len(rx)))
            text, rx, plain = [], [], True
        elif c == "?":
            rx.append("[^/]")
            plain = False
        elif c == "[" and (end := _class_end(seg, i)) > 0:
            rx.append(_set(seg[i + 1 : end], pattern))
            plain = False
            i = end
        else:
            text.append(c)
            rx.append(re.escape(c))
        i += 1
    if not pieces and plain:
        return seg
    pieces.append(_Piece("".join(text), None if plain else "".join(rx), len(rx)))
    return _Name(seg, pieces)


def _class_end(seg: str, start: int) -> int:
    """Where the `[...]` set opened at `start` closes, or -1 (then `[` is a plain `[`)."""
    j = start + 1
    if j < len(seg) and seg[j] in "!^":
        j += 1
    if j < len(seg) and seg[j] == "]":  # a leading `]` is part of the set
        j += 1
    end = seg.find("]", j)
    return end


def _set(body: str, pattern: str) -> str:
    """The inside of `[...]` as a regex for one character: `!` or `^` first negates, `x-y` is
    a range unless the `-` is first or last. ValueError for a range that runs backwards."""
    negate = body[:1] in ("!", "^")
    body = body[1:] if negate else body
    out: list[str] = []
    k = 0
    while k < len(body):
        lo = hi = body[k]
        if k + 2 < len(body) and body[k + 1] == "-":
            hi = body[k + 2]
            if hi < lo:
                raise ValueError(f"pattern {pattern!r} has a backward range {lo}-{hi}")
            k += 3
        else:
            k += 1
        out.append(f"\\U{ord(lo):08x}-\\U{ord(hi):08x}")
    return f"[{'^/' if negate else ''}{''.join(out)}]"


_STAR = None  # `**` as a whole name: any number of non-empty names


class Glob:
    """A compiled pattern: its names in order (a literal, a `_Name` or `**`), each a bit
    position; bit n (one past the last) is reached when all have matched."""

    __slots__ = ("accept", "dstar", "final", "literals", "pattern", "start", "tail", "wild")

    def __init__(self, pattern: str, items: Sequence[str | _Name | None], tail: bool) -> None:
        self.pattern = pattern
        self.tail = tail  # it ended in `**`: what is below the items' match matches
        self.final = 1 << len(items)
        self.accept = 0 if tail else self.final  # the items' match is the pattern's match
        self.dstar = 0
        self.literals: dict[str, int] = {}
        wild: dict[str, tuple[_Name, int]] = {}
        for k, item in enumerate(items):
            bit = 1 << k
            if item is _STAR:
                self.dstar |= bit
            elif isinstance(item, str):
                self.literals[item] = self.literals.get(item, 0) | bit
            else:
                bits = wild[item.text][1] if item.text in wild else 0
                wild[item.text] = (item, bits | bit)
        self.wild = list(wild.values())
        self.start = self.close(1)

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"

    def close(self, m: int) -> int:
        """`m` with the position after each `**` in it (`**`s never follow each other, and
        none is last: so a name that no literal or wildcard takes never reaches the end)."""
        return m | ((m & self.dstar) << 1)

    def step(self, m: int, name: str) -> int:
        """The positions one more name reaches from those in `m`."""
        hit = self.literals.get(name, 0)
        for seg, bits in self.wild:
            if m & bits and seg.match(name):
                hit |= bits
        nxt = (m & hit) << 1
        if name:  # `**` stays
            nxt |= m & self.dstar
        return self.close(nxt)

    def fullmatch(self, path: str) -> bool:
        """Whether it matches `path` itself (not counting the directories above it)."""
        m = self.start
        for name in path.split("/"):
            if self.tail and m & self.final:  # below what the items matched
                return True
            m = self.step(m, name)
            if not m:
                return False
        return bool(m & self.accept)


def compile_pattern(pattern: str) -> Glob:
    """A pattern compiled to match whole relative paths. ValueError if it is bad."""
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError(f"pattern {pattern!r} is empty")
    if len(pattern) > MAX_PATTERN_LEN:
        raise ValueError(f"pattern {pattern[:40]!r}... is longer than {MAX_PATTERN_LEN}")
    if "\0" in pattern:
        raise ValueError(f"pattern {pattern!r} holds a NUL byte")
    anchored = "/" in pattern.rstrip("/")
    segs = [s for s in pattern.strip("/").split("/") if s]
    tail = segs[-1] == "**"
    items: list[str | _Name | None] = [] if anchored else [_STAR]
    for seg in segs[:-1] if tail else segs:
        if seg != "**":
            items.append(_name(seg, pattern))
        elif not items or items[-1] is not _STAR:
            items.append(_STAR)
    while tail and items and items[-1] is _STAR:  # the tail takes what it would
        items.pop()
    return Glob(pattern, items, tail)


class _State:
    """The live positions of a list of patterns after some names: pattern index -> bit
    mask, none empty, in index order."""

    __slots__ = ("_quiet", "index", "masks", "restless", "wild")

    def __init__(self, globs: Sequence[Glob], masks: dict[int, int]) -> None:
        self.masks = masks
        self.wild: list[tuple[int, _Name]] = []  # the wildcard names a live position has
        self.restless: dict[int, int] = {}  # p -> mask after any other name, if different
        for p, m in masks.items():
            g = globs[p]
            if (quiet := g.close(m & g.dstar)) != m:
                self.restless[p] = quiet
            self.wild += [(p, seg) for seg, bits in g.wild if m & bits]
        self._quiet: _State | None = None
        # key -> its wildcard names here, and those without a key (_Ranker._wild)
        self.index: tuple[dict[str, list[tuple[int, _Name]]], list[tuple[int, _Name]]] | None
        self.index = None

    def quiet(self, globs: Sequence[Glob]) -> _State:
        """The state after a non-empty name that no literal or wildcard name here matches."""
        if self._quiet is None:
            if not self.restless:
                self._quiet = self
            else:
                masks = {p: self.restless.get(p, m) for p, m in self.masks.items()}
                self._quiet = _State(globs, {p: m for p, m in masks.items() if m})
        return self._quiet


class _Node:
    """A directory: the first pattern that matches it or one above it (`rank`), the first
    whose `**` tail takes everything below it (`tail`), and the positions of the patterns
    before both (no pattern after them could come first below it)."""

    __slots__ = ("cutoff", "rank", "state", "tail")

    def __init__(self, rank: int, tail: int, state: _State) -> None:
        self.rank = rank
        self.tail = tail
        self.cutoff = min(rank, tail)
        self.state = state


class _Ranker:
    """For a list of patterns, the first that matches a path or a directory above it; the
    directories' states are remembered, so a path costs about one step of its last name."""

    def __init__(self, globs: Sequence[Glob]) -> None:
        self._globs = tuple(globs)
        self.none = len(globs)
        self._literals: dict[str, list[int]] = {}  # name -> the patterns that name it
        for p, g in enumerate(globs):
            for name in g.literals:
                self._literals.setdefault(name, []).append(p)
        # A wildcard name's key: its rarest _GRAM characters in a row that a match holds.
        grams = {
            seg: sorted({t[i : i + _GRAM] for t in seg.needles for i in range(len(t) - _GRAM + 1)})
            for g in globs
            for seg, _ in g.wild
        }
        counts = Counter(gram for gs in grams.values() for gram in gs)
        self._keys = {seg: min(gs, key=counts.__getitem__) for seg, gs in grams.items() if gs}
        tail = next((p for p, g in enumerate(globs) if g.tail and g.start & g.final), self.none)
        masks = {p: g.start for p, g in enumerate(globs[:tail])}
        self._root = _Node(self.none, tail, _State(globs, masks))
        self._nodes: dict[str, _Node] = {}

    def __repr__(self) -> str:
        return f"_Ranker({[g.pattern for g in self._globs]}, {len(self._nodes)} directories)"

    def rank(self, rel: str) -> int:
        """The index of the first pattern that matches `rel` or a directory above it, or the
        number of patterns."""
        if not rel:
            return self.none
        parent, sep, name = rel.rpartition("/")
        node = self._node(parent) if sep else self._root
        masks = node.state.masks
        for p in self._moved(node.state, name):
            g = self._globs[p]
            if g.step(masks[p], name) & g.accept:
                return p
        return node.cutoff

    def _moved(self, state: _State, name: str) -> list[int]:
        """The patterns whose positions `name` may move other than `quiet` says, in order."""
        if not name:  # `**` does not take an empty name
            return list(state.masks)
        out = [p for p in self._literals.get(name, ()) if p in state.masks]
        out += [p for p, seg in self._wild(state, name) if seg.match(name)]
        return sorted(set(out))

    def _wild(self, state: _State, name: str) -> list[tuple[int, _Name]]:
        """The live wildcard names that may match `name`: with many, those whose key it
        holds (and those without a key)."""
        if len(state.wild) <= _INDEXED:
            return state.wild
        if state.index is None:
            keyed: dict[str, list[tuple[int, _Name]]] = {}
            rest: list[tuple[int, _Name]] = []
            for p, seg in state.wild:
                key = self._keys.get(seg)
                (rest if key is None else keyed.setdefault(key, [])).append((p, seg))
            state.index = (keyed, rest)
        keyed, rest = state.index
        grams = {name[i : i + _GRAM] for i in range(len(name) - _GRAM + 1)}
        return rest + [pair for gram in keyed.keys() & grams for pair in keyed[gram]]

    def _node(self, path: str) -> _Node:
        chain: list[tuple[str, str]] = []
        node = self._nodes.get(path)
        while node is None:
            parent, sep, name = path.rpartition("/")
            chain.append((path, name))
            if not sep:
                node = self._root
                break
            path = parent
            node = self._nodes.get(path)
        for path, name in reversed(chain):
            node = self._child(node, path, name)
            if len(self._nodes) >= _REMEMBERED:
                self._nodes.clear()
            self._nodes[path] = node
        return node

    def _child(self, node: _Node, path: str, name: str) -> _Node:
        state = node.state
        moved: dict[int, int] = {}
        rank = tail = node.tail  # tail: a `**` above takes this one
        for p in self._moved(state, name):
            g = self._globs[p]
            moved[p] = m = g.step(state.masks[p], name)
            if m & g.accept:
                rank = min(rank, p)
            elif g.tail and m & g.final:
                tail = min(tail, p)
        # "" (a path that starts with `/`) is not a directory of its own: no rank
        rank = min(node.rank, rank) if path else node.rank
        if not moved and name:
            nxt = state.quiet(self._globs)
            if nxt is state and rank == node.rank:
                return node
            return _Node(rank, tail, nxt)
        cutoff = min(rank, tail)
        masks: dict[int, int] = {}
        for p, m in state.masks.items():
            if p >= cutoff:
                break
            m = moved[p] if p in moved else state.restless.get(p, m)
            if m:
                masks[p] = m
        return _Node(rank, tail, _State(self._globs, masks))


class PathFilter:
    """The publish's `include` and `exclude` patterns, compiled once."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        if len(include) + len(exclude) > MAX_PATTERNS:
            raise ValueError(f"more than {MAX_PATTERNS} include and exclude patterns")
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self._include = _Ranker([compile_pattern(p) for p in self.include])
        self._exclude = _Ranker([compile_pattern(p) for p in self.exclude])

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)}, exclude={list(self.exclude)})"

    @property
    def empty(self) -> bool:
        return not self.include and not self.exclude

    def excludes(self, rel: str) -> bool:
        """Whether `rel` or a directory above it matches an exclude."""
        return self._exclude.rank(rel) < self._exclude.none

    def includes(self, rel: str) -> bool:
        """Whether `rel` is wanted by the includes: there are none, or it or a directory
        above it matches one."""
        return not self.include or self._include.rank(rel) < self._include.none

    def keeps(self, rel: str) -> bool:
        return self.includes(rel) and not self.excludes(rel)


def order_work(rels: Sequence[str], patterns: Sequence[str]) -> int:
    """A bound on load_order's work, in pattern characters times paths: a name is stepped
    through each live wildcard name, a step a piece, so patterns of many `?*` pieces cost
    that much for every path (256 patterns of 1,000 characters: 17 ms a path)."""
    return sum(map(len, patterns)) * len(rels) if patterns else 0


def load_order(
    rels: Sequence[str], patterns: Sequence[str], stop: Callable[[], bool] | None = None
) -> list[int]:
    """The indices of `rels` in a load order (a progressive restore's `order`): those the
    first pattern matches (a path, or a glob as above), then the second's, ..., then the
    rest; each group in its given order. `stop()`, where given, is asked every 256 paths:
    true, and InterruptedError is raised (the caller gave up)."""
    if not patterns:
        return list(range(len(rels)))
    ranker = _Ranker([compile_pattern(p) for p in patterns])
    ranks = [0] * len(rels)
    # Sorted, a directory's paths come together, so its state is still remembered.
    for n, i in enumerate(sorted(range(len(rels)), key=rels.__getitem__)):
        if stop is not None and not n & 255 and stop():
            raise InterruptedError("the load order was given up")
        ranks[i] = ranker.rank(rels[i])
    return sorted(range(len(rels)), key=ranks.__getitem__)
