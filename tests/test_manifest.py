"""The manifest: canonical round trip, and everything `decode` must refuse, with the reason.

Bad manifests are built as plain documents and packed with msgpack, so that `decode` sees
exactly the bytes an attacker or a buggy publisher could put at the origin. Each case
changes one thing from a document that decodes (see `test_the_base_document_decodes`).
"""

from __future__ import annotations

import posixpath
import re
import tracemalloc
from typing import Any

import blake3
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core import manifest as mf
from hostd.errors import ManifestError

CS = 64 * 1024
ID = bytes(range(32))

# -- documents --------------------------------------------------------------------------------


def fdoc(path: Any, size: Any = 1, mode: Any = 0o644, chunks: Any = None) -> dict[str, Any]:
    """A file map; its chunks are computed from `size` unless given."""
    if chunks is None:
        n = -(-size // CS)
        chunks = [[ID, min(CS, size - i * CS), mf.CODEC_RAW] for i in range(n)]
    return {"chunks": chunks, "mode": mode, "path": path, "size": size}


def sdoc(path: Any, target: Any) -> dict[str, Any]:
    return {"path": path, "target": target}


def doc(files: Any = (), symlinks: Any = (), dirs: Any = (), **top: Any) -> dict[str, Any]:
    """A manifest document; tuples become arrays, anything else is packed as given."""

    def arr(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    d: dict[str, Any] = {
        "chunk_size": CS,
        "compat": {"format": "1"},
        "dirs": arr(dirs),
        "files": arr(files),
        "format": 1,
        "meta": {},
        "symlinks": arr(symlinks),
    }
    d.update(top)
    return d


def pack(d: Any) -> bytes:
    out: bytes = msgpack.packb(d, use_bin_type=True)
    return out


def base_doc() -> dict[str, Any]:
    return doc(
        files=[fdoc("a/f", CS + 10), fdoc("b", 0)],
        symlinks=[sdoc("a/l", "f")],
        dirs=["e"],
        compat={"arch": "x86_64", "format": "1"},
        meta={"k": "v"},
    )


BASE = pack(base_doc())


def rejects(data: bytes, fragment: str) -> ManifestError:
    with pytest.raises(ManifestError, match=re.escape(fragment)) as info:
        mf.decode(data)
    return info.value


def test_the_base_document_decodes() -> None:
    m = mf.decode(BASE)
    assert [f.path for f in m.files] == ["a/f", "b"]
    assert [c.size for c in m.files[0].chunks] == [CS, 10]
    assert m.files[1].chunks == ()
    assert m.symlinks == (mf.Symlink("a/l", "f"),)
    assert m.dirs == ("e",)
    assert m.snapshot_id == blake3.blake3(BASE).hexdigest()


# -- round trip over generated valid manifests ------------------------------------------------

_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=5
).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_names, min_size=1, max_size=3).map("/".join)
_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)


@st.composite
def manifests(draw: st.DrawFn) -> mf.Manifest:
    chunk_size = 1 << draw(st.integers(16, 28))
    fmt = draw(st.sampled_from(mf.READABLE_FORMATS))
    pack_ids = draw(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=3))
    pack_pool = [(p, 1 << 50) for p in pack_ids]

    def packed(size: int) -> mf.Packed | None:
        if fmt == 1 or not draw(st.booleans()):
            return None
        length = draw(st.integers(1, mf.max_stored_size(size)))
        pack, pack_size = draw(st.sampled_from(pack_pool))
        return mf.Packed(pack, draw(st.integers(0, 1 << 40)), length, pack_size)

    kinds = draw(st.dictionaries(_paths, st.sampled_from(["file", "symlink", "dir"]), max_size=8))

    def under_leaf(path: str) -> bool:
        parent = posixpath.dirname(path)
        while parent:
            if kinds.get(parent) in ("file", "symlink"):
                return True
            parent = posixpath.dirname(parent)
        return False

    kept = {p: k for p, k in kinds.items() if not under_leaf(p)}
    files, symlinks, dirs = [], [], []
    for path, kind in kept.items():
        if kind == "dir":
            dirs.append(path)
        elif kind == "symlink":
            ups = draw(st.integers(0, path.count("/")))
            rest = draw(st.lists(_names, min_size=0 if ups else 1, max_size=2))
            symlinks.append(mf.Symlink(path, "/".join([".."] * ups + rest)))
        else:
            size = draw(st.integers(0, 3 * chunk_size))
            n = -(-size // chunk_size)
            sizes = [chunk_size if i < n - 1 else size - chunk_size * (n - 1) for i in range(n)]
            chunks = tuple(
                mf.Chunk(
                    draw(st.binary(min_size=32, max_size=32)),
                    s,
                    draw(st.sampled_from(mf.CODECS)),
                    packed(s),
                )
                for s in sizes
            )
            mtime = None if fmt == 1 else draw(st.integers(mf.MIN_MTIME, mf.MAX_MTIME))
            files.append(mf.FileEntry(path, draw(st.integers(0, 0o777)), size, chunks, mtime))
    compat = draw(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), _text))
    meta = draw(st.dictionaries(_text, _text, max_size=4))
    # Given in reverse order: build puts entries and maps in canonical order itself.
    return mf.build(
        chunk_size=chunk_size,
        files=files[::-1],
        symlinks=symlinks[::-1],
        dirs=dirs[::-1],
        compat=dict(reversed(list(compat.items()))),
        meta=dict(reversed(list(meta.items()))),
        format=fmt,
    )


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_decode_encode_round_trip_and_stable_id(m: mf.Manifest) -> None:
    data = mf.encode(m)
    back = mf.decode(data)
    assert back == m
    assert mf.encode(back) == data
    assert back.snapshot_id == m.snapshot_id == blake3.blake3(data).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", m.snapshot_id)
    rebuilt = mf.build(
        chunk_size=m.chunk_size,
        files=m.files,
        symlinks=m.symlinks,
        dirs=m.dirs,
        compat=m.compat,
        meta=m.meta,
        format=m.format,
    )
    assert rebuilt.snapshot_id == m.snapshot_id


@settings(max_examples=60, deadline=None)
@given(manifests(), st.data())
def test_a_changed_byte_is_refused_or_is_another_canonical_manifest(
    m: mf.Manifest, data: st.DataObject
) -> None:
    raw = bytearray(mf.encode(m))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    try:
        other = mf.decode(bytes(raw))
    except ManifestError:
        return
    assert mf.encode(other) == bytes(raw)
    assert other.snapshot_id != m.snapshot_id


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_manifest_error(data: bytes) -> None:
    try:
        m = mf.decode(data)
    except ManifestError:
        return
    assert mf.encode(m) == data  # only canonical bytes ever decode


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=33),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


def _slots(d: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a document a value can be put: keys of maps, indexes of arrays."""
    out = [at] if at else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _slots(v, (*at, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _slots(v, (*at, i))
    return out


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_slots(base_doc())), _values)
def test_any_value_anywhere_is_refused_or_canonical(at: tuple[Any, ...], value: Any) -> None:
    d = base_doc()
    parent = d
    for k in at[:-1]:
        parent = parent[k]
    parent[at[-1]] = value
    data = pack(d)
    try:
        m = mf.decode(data)
    except ManifestError:
        return
    assert mf.encode(m) == data


# -- refused bytes ----------------------------------------------------------------------------


def test_every_truncation_is_refused() -> None:
    for n in range(len(BASE)):
        rejects(BASE[:n], "not valid msgpack")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xc1", "not valid msgpack"),  # a byte msgpack never uses
        (BASE + b"\x00", "not valid msgpack"),  # trailing bytes
        (b"\xff", "manifest is not a map"),  # -1, a negative fixint
        (pack([1, 2, 3]), "manifest is not a map"),
        (pack("manifest"), "manifest is not a map"),
        (pack({1: 2}), "not valid msgpack"),  # map keys are strings
    ],
)
def test_garbage(data: bytes, fragment: str) -> None:
    rejects(data, fragment)


def _reorder(d: dict[str, Any]) -> dict[str, Any]:
    return dict(reversed(list(d.items())))


def _swap(data: bytes, old: str, new: str) -> bytes:
    o, n = bytes.fromhex(old), bytes.fromhex(new)
    assert data.count(o) == 1
    return data.replace(o, n)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (pack(_reorder(base_doc())), "not in canonical form"),
        (pack({**base_doc(), "compat": _reorder(base_doc()["compat"])}), "not in canonical form"),
        (pack(doc(files=[_reorder(fdoc("a"))])), "not in canonical form"),
        # the same values with longer encodings than needed
        (_swap(BASE, "a473697a6500", "a473697a65cc00"), "not in canonical form"),  # size 0
        (_swap(BASE, "73697a65ce00010000", "73697a65cf0000000000010000"), "not in canonical"),
        (_swap(BASE, "a16b", "d9016b"), "not in canonical form"),  # "k" as str8
        (_swap(BASE, "91a165", "dc0001a165"), "not in canonical form"),  # dirs as array16
    ],
    ids=["top-keys", "compat-keys", "file-keys", "uint8", "uint64", "str8", "array16"],
)
def test_non_canonical_encodings(data: bytes, fragment: str) -> None:
    rejects(data, fragment)


def test_a_repeated_map_key_is_not_canonical() -> None:
    top = pack(base_doc())
    # base is a fixmap of 7 keys: make it 8, the last repeating "meta".
    repeated = bytes([0x88]) + top[1:] + pack("meta") + pack({})
    rejects(repeated, "not in canonical form")


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (doc(chunk_size=65536.0), "chunk_size 65536.0 is not a power of two"),
        (doc(format=1.0), "manifest format 1.0 is not supported"),
        (doc(format=True), "manifest format True is not supported"),
        (doc(files=[fdoc("a", mode=420.0)]), "mode 420.0 is not in 0..0o777"),
        (doc(files=[fdoc("a", size=1.0, chunks=[[ID, 1, 0]])]), "size 1.0 is not a non-negative"),
        (doc(files=[fdoc("a", chunks=[[ID, 1.0, 0]])]), "chunk 0 size 1.0, want 1"),
        (doc(files=[fdoc("a", chunks=[[ID, 1, 0.0]])]), "chunk 0 codec 0.0 is unknown"),
        (doc(meta={"k": 1.5}), "keys and values must be strings"),
    ],
)
def test_floats_are_refused(d: dict[str, Any], fragment: str) -> None:
    rejects(pack(d), fragment)


def _with_bin_key(d: dict[str, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = dict(d)
    out[b"extra"] = 1
    return out


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        ({**base_doc(), "extra": 1}, "manifest keys ["),
        ({k: v for k, v in base_doc().items() if k != "meta"}, "manifest keys ["),
        (_with_bin_key(base_doc()), "manifest keys ["),  # a bin key among str keys
        (doc(files=[{**fdoc("a"), "uid": 0}]), "files[0] has keys"),
        (doc(files=[{"path": "a", "size": 0, "mode": 0}]), "files[0] has keys"),
        (doc(symlinks=[{**sdoc("l", "x"), "mode": 0}]), "symlinks[0] has keys"),
    ],
)
def test_extra_or_missing_keys(d: dict[Any, Any], fragment: str) -> None:
    rejects(pack(d), fragment)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("dirs", "dir: path [] is not a non-empty string"),
        ("symlinks", "symlinks[0] is not a map"),
        ("packs", "packs[0] is not [id, size]"),
        ("zzz", "manifest keys ['zzz', ...]"),
    ],
)
def test_a_list_of_empty_lists_is_refused_at_its_first_item(key: str, fragment: str) -> None:
    """A manifest is read from the origin before anything vouches for it: 8 MiB of empty
    arrays in `dirs` (one byte each) took 600 MB to read before a check said no. Each item
    is checked as it is read, and a key no manifest has before its value is read."""
    import tracemalloc

    data = pack({**doc(), key: [[]] * 2_000_000})
    tracemalloc.start()
    try:
        rejects(data, fragment)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000  # (2,000,000 lists: 100 MB)


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (doc(files={}), "files is not a list"),
        (doc(symlinks="l"), "symlinks is not a list"),
        (doc(dirs={"e": 1}), "dirs is not a list"),
        (doc(compat=["format"]), "compat is not a map"),
        (doc(meta=None), "meta is not a map"),
        (doc(files=["a"]), "files[0] is not a map"),
        (doc(symlinks=[["l", "x"]]), "symlinks[0] is not a map"),
        (doc(files=[fdoc("a", chunks={})]), "files[0].chunks is not a list"),
        (doc(files=[fdoc("a", chunks=[[ID, 1]])]), "files[0].chunks[0] is not [id, size, codec]"),
        (doc(files=[fdoc("a", chunks=[ID])]), "files[0].chunks[0] is not [id, size, codec]"),
        (doc(files=[fdoc("a", chunks=[[ID.hex(), 1, 0]])]), "chunk 0 id is not 32 bytes"),
        (doc(files=[fdoc("a", chunks=[[ID[:31], 1, 0]])]), "chunk 0 id is not 32 bytes"),
        (doc(files=[fdoc("a", chunks=[[ID + b"x", 1, 0]])]), "exceeds max_bin_len(32)"),
        (doc(files=[fdoc(b"a")]), "file: path b'a' is not a non-empty string"),
        (doc(files=[fdoc(None)]), "file: path None is not a non-empty string"),
        (doc(files=[fdoc("a", size="1", chunks=[[ID, 1, 0]])]), "size '1' is not a non-negative"),
        (doc(files=[fdoc("a", size=True, chunks=[[ID, 1, 0]])]), "size True is not a non-negative"),
        (doc(files=[fdoc("a", size=-1, chunks=[])]), "size -1 is not a non-negative integer"),
        (doc(files=[fdoc("a", chunks=[[ID, True, 0]])]), "chunk 0 size True, want 1"),
        (doc(files=[fdoc("a", chunks=[[ID, 1, True]])]), "chunk 0 codec True is unknown"),
        (doc(dirs=[7]), "dir: path 7 is not a non-empty string"),
        (doc(symlinks=[sdoc(7, "x")]), "symlink: path 7 is not a non-empty string"),
        (doc(symlinks=[sdoc("l", b"x")]), "target b'x' is not a non-empty string"),
        (doc(compat={"format": 1}), "compat entry 'format': keys and values must be strings"),
        (doc(compat={b"format": "1"}), "keys and values must be strings"),
        (doc(meta={"k": None}), "meta entry 'k': keys and values must be strings"),
        (doc(chunk_size="65536"), "chunk_size '65536' is not a power of two"),
        (doc(chunk_size=None), "chunk_size None is not a power of two"),
    ],
)
def test_wrong_types(d: dict[str, Any], fragment: str) -> None:
    rejects(pack(d), fragment)


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (3, "manifest format 3 is not supported (this hostd reads 1, 2)"),
        (0, "manifest format 0 is not supported"),
        ("1", "manifest format '1' is not supported"),
        (None, "manifest format None is not supported"),
    ],
)
def test_unknown_format_version(version: Any, fragment: str) -> None:
    rejects(pack(doc(format=version)), fragment)


# -- paths ------------------------------------------------------------------------------------

BAD_PATHS = [
    ("..", "has a '..' component"),
    ("../x", "has a '..' component"),
    ("a/../b", "has a '..' component"),
    ("a/..", "has a '..' component"),
    (".", "has a '.' component"),
    ("./a", "has a '.' component"),
    ("a/./b", "has a '.' component"),
    ("/etc/passwd", "is absolute"),
    ("a//b", "has a 'empty' component"),
    ("a/", "has a 'empty' component"),
    ("a\x00b", "contains a NUL byte"),
    ("", "is not a non-empty string"),
    ("x" * 4097, "longer than 4096 bytes"),
    ("é" * 2049, "longer than 4096 bytes"),  # 4098 bytes in UTF-8
]


@pytest.mark.parametrize(("path", "fragment"), BAD_PATHS)
def test_bad_file_paths(path: str, fragment: str) -> None:
    err = rejects(pack(doc(files=[fdoc(path)])), fragment)
    assert err.message.startswith("file: path")


@pytest.mark.parametrize(("path", "fragment"), BAD_PATHS)
def test_bad_dir_and_symlink_paths(path: str, fragment: str) -> None:
    rejects(pack(doc(dirs=[path])), fragment)
    rejects(pack(doc(symlinks=[sdoc(path, "x")])), fragment)


@pytest.mark.parametrize(("path", "fragment"), BAD_PATHS[:12])
def test_build_refuses_bad_paths_too(path: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(fragment)):
        mf.build(chunk_size=CS, files=[], dirs=[path])


def test_longest_path_is_allowed() -> None:
    mf.decode(pack(doc(files=[fdoc("x" * 4096)])))


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (doc(files=[fdoc("a"), fdoc("a")]), "file 'a' is out of order or repeated"),
        (doc(dirs=["d", "d"]), "dir 'd' is out of order or repeated"),
        (doc(symlinks=[sdoc("l", "x"), sdoc("l", "y")]), "symlink 'l' is out of order or repeated"),
        (doc(files=[fdoc("a")], dirs=["a"]), "path 'a' appears twice (file and dir)"),
        (doc(files=[fdoc("a")], symlinks=[sdoc("a", "b")]), "appears twice (file and symlink)"),
        (doc(symlinks=[sdoc("a", "b")], dirs=["a"]), "appears twice (symlink and dir)"),
        (doc(files=[fdoc("b"), fdoc("a")]), "file 'a' is out of order or repeated"),
        (doc(dirs=["b", "a"]), "dir 'a' is out of order or repeated"),
        (doc(symlinks=[sdoc("b", "x"), sdoc("a", "x")]), "symlink 'a' is out of order"),
    ],
)
def test_duplicate_and_unsorted_paths(d: dict[str, Any], fragment: str) -> None:
    rejects(pack(d), fragment)


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (doc(files=[fdoc("a"), fdoc("a/b")]), "path 'a/b' is inside file 'a'"),
        (doc(files=[fdoc("a"), fdoc("a/x/y")]), "path 'a/x/y' is inside file 'a'"),
        (doc(files=[fdoc("a")], dirs=["a/d"]), "path 'a/d' is inside file 'a'"),
        (doc(files=[fdoc("a")], symlinks=[sdoc("a/l", "x")]), "path 'a/l' is inside file 'a'"),
        (doc(files=[fdoc("l/f")], symlinks=[sdoc("l", "d")]), "path 'l/f' is inside symlink 'l'"),
        (doc(symlinks=[sdoc("l", "d")], dirs=["l/x/y"]), "path 'l/x/y' is inside symlink 'l'"),
        (
            doc(symlinks=[sdoc("d/l", "x"), sdoc("d/l/m", "y")]),
            "path 'd/l/m' is inside symlink 'd/l'",
        ),
    ],
)
def test_no_entry_under_a_file_or_a_symlink(d: dict[str, Any], fragment: str) -> None:
    rejects(pack(d), fragment)


def test_entries_under_listed_dirs_are_fine() -> None:
    m = mf.decode(pack(doc(files=[fdoc("d/e/f")], dirs=["d", "d/e"])))
    assert m.dirs == ("d", "d/e")


# -- symlink targets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target", "fragment"),
    [
        ("l", "/etc/passwd", "is absolute and leaves the tree"),
        ("a/b/l", "/a", "is absolute and leaves the tree"),
        ("l", "..", "points outside the tree"),
        ("l", "../x", "points outside the tree"),
        ("a/l", "../../x", "points outside the tree"),
        ("a/b/l", "../../../x", "points outside the tree"),
        ("l", "a/../..", "is not in normal form"),
        ("a/l", "x/../y", "is not in normal form"),  # inner '..'
        ("a/l", "../x/../..", "is not in normal form"),
        ("l", "./x", "is not in normal form"),
        ("l", "x/./y", "is not in normal form"),
        ("l", "x//y", "is not in normal form"),
        ("l", "x/", "is not in normal form"),
        ("l", "../", "is not in normal form"),
        ("l", ".", "is not in normal form"),
        ("l", "", "is not a non-empty string"),
        ("l", None, "is not a non-empty string"),
        ("l", "x\x00", "target contains a NUL byte"),
    ],
)
def test_symlinks_pointing_outside_or_not_normal(link: str, target: Any, fragment: str) -> None:
    err = rejects(pack(doc(symlinks=[sdoc(link, target)])), fragment)
    assert err.message.startswith(f"symlink {link!r}")


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("l", "x"),
        ("l", "x/y/z"),
        ("a/l", ".."),  # the tree's root
        ("a/l", "../x"),
        ("a/b/l", "../../x"),
        ("a/b/l", "../.."),
        ("a/b/l", "../c/d"),
        ("l", "dangling"),  # may point at nothing: it still cannot leave
    ],
)
def test_symlinks_that_stay_inside(link: str, target: str) -> None:
    m = mf.decode(pack(doc(symlinks=[sdoc(link, target)])))
    assert m.symlinks == (mf.Symlink(link, target),)


# -- chunks, sizes, modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (doc(files=[fdoc("a", 5, chunks=[])]), "file 'a': 0 chunks for 5 bytes, want 1"),
        (doc(files=[fdoc("a", 0, chunks=[[ID, 1, 0]])]), "1 chunks for 0 bytes, want 0"),
        (doc(files=[fdoc("a", CS + 1, chunks=[[ID, CS, 0]])]), "1 chunks for 65537 bytes, want 2"),
        (doc(files=[fdoc("a", CS, chunks=[[ID, CS, 0]] * 2)]), "2 chunks for 65536 bytes, want 1"),
        (doc(files=[fdoc("a", 5, chunks=[[ID, 4, 0]])]), "chunk 0 size 4, want 5"),
        (doc(files=[fdoc("a", 5, chunks=[[ID, 6, 0]])]), "chunk 0 size 6, want 5"),
        (
            doc(files=[fdoc("a", CS + 2, chunks=[[ID, CS - 1, 0], [ID, 3, 0]])]),
            "chunk 0 size 65535, want 65536",
        ),
        (
            doc(files=[fdoc("a", CS + 2, chunks=[[ID, CS, 0], [ID, 3, 0]])]),
            "chunk 1 size 3, want 2",
        ),
        (doc(files=[fdoc("a", chunks=[[ID, 1, 2]])]), "file 'a': chunk 0 codec 2 is unknown"),
        (doc(files=[fdoc("a", chunks=[[ID, 1, -1]])]), "chunk 0 codec -1 is unknown"),
    ],
)
def test_chunk_count_and_size_mismatches(d: dict[str, Any], fragment: str) -> None:
    rejects(pack(d), fragment)


@pytest.mark.parametrize("mode", [-1, 0o1000, 0o4755, 0o1777, True])
def test_bad_modes(mode: Any) -> None:
    rejects(pack(doc(files=[fdoc("a", mode=mode)])), f"file 'a': mode {mode!r} is not in 0..0o777")


@pytest.mark.parametrize("mode", [0, 0o644, 0o777])
def test_good_modes(mode: int) -> None:
    assert mf.decode(pack(doc(files=[fdoc("a", mode=mode)]))).files[0].mode == mode


@pytest.mark.parametrize(
    "chunk_size", [0, 1, 32 * 1024, 64 * 1024 - 1, 3 * 64 * 1024, 512 * 1024 * 1024, -CS]
)
def test_bad_chunk_sizes(chunk_size: int) -> None:
    rejects(
        pack(doc(chunk_size=chunk_size)),
        f"chunk_size {chunk_size} is not a power of two in [64 KiB, 256 MiB]",
    )


@pytest.mark.parametrize("chunk_size", [64 * 1024, 4 * 1024 * 1024, 256 * 1024 * 1024])
def test_good_chunk_sizes(chunk_size: int) -> None:
    assert mf.decode(pack(doc(chunk_size=chunk_size))).chunk_size == chunk_size


@pytest.mark.parametrize("name", ["GPU", "9x", "", "a-b", "a" * 65, "é"])
def test_bad_compat_fact_names(name: str) -> None:
    rejects(pack(doc(compat={name: "x"})), f"compat fact name {name!r} is not")


# -- format 2: mtimes and packs -------------------------------------------------------------

P1, P2 = b"\x01" * 32, b"\x02" * 32


def v2(files: Any, packs: Any) -> dict[str, Any]:
    """A format 2 document: keys in canonical order (packs between meta and symlinks)."""
    return {
        "chunk_size": CS,
        "compat": {"format": "2"},
        "dirs": [],
        "files": files,
        "format": 2,
        "meta": {},
        "packs": packs,
        "symlinks": [],
    }


def f2(path: str, chunk: list[Any], mtime: Any = 5, size: int = 10) -> dict[str, Any]:
    return {"chunks": [chunk], "mode": 0o644, "mtime": mtime, "path": path, "size": size}


def test_format_2_decodes_mtimes_and_packed_chunks() -> None:
    m = mf.decode(pack(v2([f2("a", [ID, 10, 0, 0, 7, 10], mtime=-3)], [[P1, 100]])))
    (f,) = m.files
    assert f.mtime == -3
    assert f.chunks[0].packed == mf.Packed(P1, 7, 10, 100)
    assert mf.decode(m.encoded) == m


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (v2([{**f2("a", [ID, 10, 0]), "mtime": None}], []), "mtime None is not a signed 64-bit"),
        (v2([f2("a", [ID, 10, 0], mtime=1 << 63)], []), "is not a signed 64-bit"),
        (v2([f2("a", [ID, 10, 0])], [[P1, 10]]), "packs lists 1 packs, but the chunks name 0"),
        (v2([f2("a", [ID, 10, 0, 1, 0, 10])], [[P1, 10]]), "pack index 1 is not in packs"),
        (v2([f2("a", [ID, 10, 0, 0, 0, 10])], [[P2, 10], [P1, 10]]), "out of order or repeated"),
        (v2([f2("a", [ID, 10, 0, 0, 5, 10])], [[P1, 10]]), "end past its pack's size"),
        (v2([f2("a", [ID, 10, 0, 0, 0, 0])], [[P1, 10]]), "stored length 0 is not in 1.."),
        (v2([f2("a", [ID, 10, 0, 0, 0, 1 << 20])], [[P1, 1 << 21]]), "is not in 1.."),
        (v2([f2("a", [ID, 10, 0, 0, 0, 10])], [[P1, 0]]), "size 0 is not a positive integer"),
        (v2([f2("a", [ID, 10, 0, 0, 0])], [[P1, 10]]), "or [id, size, codec, pack, offset, "),
    ],
)
def test_format_2_refusals(d: Any, fragment: str) -> None:
    rejects(pack(d), fragment)


def test_format_1_has_neither_mtimes_nor_packs() -> None:
    with_mtime = doc(files=[{**fdoc("a", 10), "mtime": 5}])
    rejects(pack(with_mtime), "files[0] has keys")
    packed = doc(files=[fdoc("a", 10, chunks=[[ID, 10, 0, 0, 0, 10]])])
    rejects(pack(packed), "is not [id, size, codec]")
    rejects(pack({**doc(), "packs": []}), "manifest keys")


# -- runs: files are read RUN at a time, each run checked canonical in one packing ----------


def _many(n: int, odd: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A format 2 document of `n` one-chunk packed files; `odd` replaces some of them."""
    files = [f2(f"f{i:05d}", [ID, 10, 0, 0, 10 * i, 10]) for i in range(n)]
    for i, f in (odd or {}).items():
        files[i] = f
    return v2(files, [[P1, 10 * n]])


def test_a_manifest_of_several_runs_round_trips() -> None:
    n = 2 * mf.RUN + 3
    m = mf.decode(pack(_many(n)))
    assert [f.path for f in m.files] == [f"f{i:05d}" for i in range(n)]
    assert m.files[-1].chunks[0].packed == mf.Packed(P1, 10 * (n - 1), 10, 10 * n)
    assert mf.encode(m) == pack(_many(n))


def test_a_value_past_the_first_run_is_checked_canonical() -> None:
    n = mf.RUN + 3
    last = f2(f"f{n - 1:05d}", [ID, 10, 0, 0, 10 * (n - 1), 10], mtime=0x12345)
    data = pack(_many(n, {n - 1: last}))
    mf.decode(data)
    # the same mtime as a uint64, not the shortest form
    rejects(_swap(data, "a56d74696d65ce00012345", "a56d74696d65cf0000000000012345"), "canonical")


def test_in_a_run_cut_short_what_came_before_is_judged_first() -> None:
    """A value msgpack cannot read (a bin over 32 bytes) cuts the run short: the files read
    before it are judged as reading one at a time would, and their fault is the one told."""
    wrong_keys = {"chunks": [[ID, 10, 0, 0, 0, 10]], "mode": 0o644, "path": "x", "size": 10}
    long_id = f2("y", [b"\x07" * 33, 10, 0, 0, 0, 10])
    i = mf.RUN + 1
    rejects(pack(_many(i + 4, {i: wrong_keys, i + 2: long_id})), f"files[{i}] has keys")
    rejects(pack(_many(i + 4, {i: long_id, i + 2: wrong_keys})), "not valid msgpack")


def test_encoding_a_big_manifest_holds_little_beside_its_bytes() -> None:
    """A publish's peak was the manifest encoded as one document of dicts and lists (~6x
    its bytes) beside the entries; packed a file at a time, the buffer's growth and the
    final copy are all it holds (under 4x its bytes)."""
    pack = bytes(32)
    files = [
        mf.FileEntry(
            f"dir{i // 100:04d}/file{i:06d}.pyc",
            0o644,
            100,
            (
                mf.Chunk(
                    blake3.blake3(b"%d" % i).digest(),
                    100,
                    0,
                    mf.Packed(pack, 100 * i, 100, 4 << 20),
                ),
            ),
            1_700_000_000_000_000_000 + i,
        )
        for i in range(20_000)
    ]
    m = mf.build(chunk_size=4 << 20, files=files)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = mf.encode(m)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data), (peak, len(data))
    assert mf.decode(data).files == m.files  # and it is still the canonical encoding
