"""hostd.loader: safetensors files in, arrays out, and every hostile header refused.

Good files are written by the real writer (safetensors.numpy.save_file) and read back against
the real reader (safetensors.numpy.load). Bad files are built byte by byte, each breaking one
rule of a base file that loads (see `test_the_base_file_loads`), and each is also checked
against the reference, so hostd refuses what safetensors refuses.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as reference_load_file
from safetensors.numpy import save as reference_save
from safetensors.numpy import save_file

from hostd import loader
from hostd.errors import UsageError
from hostd.loader import LoaderError, LoaderUnavailable

ROOT = Path(__file__).resolve().parent.parent
HAS_TORCH = importlib.util.find_spec("torch") is not None

# safetensors code -> the numpy dtype the writer takes for it
NUMPY: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "C64": np.complex64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NO_REFERENCE = {"F8_E4M3", "F8_E5M2"}  # safetensors.numpy writes these but cannot read them


def arrays_of(code: str, seed: int = 0) -> np.ndarray[Any, Any]:
    """A (3, 5) array of `code` with arbitrary bits (bools 0 or 1)."""
    dtype: np.dtype[Any] = np.dtype(NUMPY[code])
    rng = np.random.default_rng(seed)
    if code == "BOOL":
        return rng.integers(0, 2, size=(3, 5)).astype(np.bool_)
    raw = rng.integers(0, 256, size=15 * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(3, 5)


def same(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (NaNs compare equal, which == would not)."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())


def write_raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def write_header(path: Path, header: Any, data: bytes = b"") -> Path:
    return write_raw(path, json.dumps(header).encode(), data)


# -- good files ---------------------------------------------------------------------------------


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    tensors = {code.lower(): arrays_of(code, i) for i, code in enumerate(NUMPY)}
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["scalar_bf16"] = np.array(-1.5, dtype=ml_dtypes.bfloat16)
    tensors["empty"] = np.zeros((0, 7), dtype=np.int16)
    tensors["empty_bf16"] = np.zeros((4, 0, 2), dtype=ml_dtypes.bfloat16)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "np", "note": "ü"})

    got = loader.load_file(path)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert same(got[name], want), name

    header = loader.read_header(path)
    assert header.metadata == {"format": "np", "note": "ü"}
    assert header.tensors["bf16"].dtype == "BF16"
    assert header.tensors["scalar"].shape == ()
    assert header.tensors["empty"].shape == (0, 7)
    assert header.data_start == 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert header.data_start + header.data_size == path.stat().st_size
    assert list(got) == list(header.tensors)  # file order

    readable = {n: a for n, a in tensors.items() if n.upper() not in NO_REFERENCE}
    ref_path = tmp_path / "readable.safetensors"
    save_file(readable, str(ref_path))
    ref = reference_load_file(ref_path)
    mine = loader.load_file(ref_path)
    assert set(ref) == set(mine)
    for name in ref:
        assert same(mine[name], ref[name]), name


def test_arrays_own_their_memory(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.int8)}, str(path))
    before = path.read_bytes()
    got = loader.load_file(path)
    for arr in got.values():
        assert arr.flags.owndata
        assert arr.base is None
        assert arr.flags.writeable
        assert arr.flags.c_contiguous
    got["w"][:] = -1
    got["b"][:] = 7
    assert path.read_bytes() == before
    assert same(loader.load_file(path)["w"], np.arange(1000, dtype=np.float32))


def test_a_file_with_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    save_file({}, str(path), metadata={"k": "v"})
    assert loader.load_file(path) == {}
    assert loader.read_header(path).metadata == {"k": "v"}


@pytest.mark.parametrize("threads", [1, 3])
def test_many_runs_and_short_reads_read_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """Pieces and buffer lists cut small, and preadv filling at most 7 bytes a call: every
    boundary of the read loop is crossed, and the arrays still hold the file's bytes."""
    tensors = {f"t{i}": arrays_of(code, i) for i, code in enumerate(NUMPY)}
    tensors["empty"] = np.zeros(0, np.float32)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    real_preadv = os.preadv

    def stingy(fd: int, buffers: list[memoryview], offset: int) -> int:
        """preadv that fills at most 7 bytes a call, across buffer boundaries."""
        left, short = 7, []
        for buf in buffers:
            if left == 0:
                break
            short.append(buf[:left])
            left -= len(short[-1])
        return real_preadv(fd, short, offset)

    monkeypatch.setattr(loader, "PIECE", 40)
    monkeypatch.setattr(loader, "_IOV_MAX", 3)
    monkeypatch.setattr(os, "preadv", stingy)
    got = loader.load_file(path, threads=threads)
    for name, want in tensors.items():
        assert same(got[name], want), name


def test_unaligned_and_oddly_ordered_offsets_load(tmp_path: Path) -> None:
    """Another writer may order tensors by name and not align them: still valid."""
    a = np.arange(3, dtype=np.int8)  # 3 bytes, so b starts at an odd offset
    b = np.arange(2, dtype=np.float64)
    header = {
        "b": {"dtype": "F64", "shape": [2], "data_offsets": [3, 19]},
        "a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
    }
    path = write_header(tmp_path / "u.safetensors", header, a.tobytes() + b.tobytes())
    got = loader.load_file(path)
    assert list(got) == ["a", "b"]
    assert same(got["a"], a)
    assert same(got["b"], b)
    assert got["b"].flags.aligned


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
        st.tuples(
            st.sampled_from(sorted(NUMPY)),
            st.lists(st.integers(0, 4), max_size=3),
            st.integers(0, 2**32 - 1),
        ),
        max_size=6,
    ),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_random_files_round_trip(
    specs: dict[str, tuple[str, list[int], int]], metadata: dict[str, str]
) -> None:
    tensors = {}
    for name, (code, shape, seed) in specs.items():
        dtype = np.dtype(NUMPY[code])
        n = int(np.prod(shape)) if shape else 1
        raw = np.random.default_rng(seed).integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
        if code == "BOOL":
            raw &= 1
        tensors[name] = raw.view(dtype).reshape(shape)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.safetensors"
        save_file(tensors, str(path), metadata=metadata or None)
        got = loader.load_file(path)
        assert loader.read_header(path).metadata == metadata
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert same(got[name], want), name


# -- hostile files --------------------------------------------------------------------------

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BASE: dict[str, Any] = {"__metadata__": {"k": "v"}, "a": F32x2}
DATA = bytes(8)


def with_a(**fields: Any) -> dict[str, Any]:
    return {"a": {**F32x2, **fields}}


# name -> (header (dict, or raw JSON bytes), data, message regex, tensor named in it or None)
HOSTILE: dict[str, tuple[Any, bytes, str, str | None]] = {
    "not JSON": (b"{'a': 1}", DATA, r"not valid JSON", None),
    "truncated JSON": (b'{"a": {"dtype": "F32"', DATA, r"not valid JSON", None),
    "NaN": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', DATA,
            r"NaN is not a JSON value", None),
    "not UTF-8": (b'{"\xff": 1}', DATA, r"not UTF-8", None),
    "trailing NUL in header": (json.dumps(BASE).encode() + b"\0", DATA, r"not valid JSON", None),
    "a list": ([], DATA, r"header is a list, not a JSON object", None),
    "a string": ("x", DATA, r"header is a string, not a JSON object", None),
    "duplicate tensor names": (
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        DATA, r"names 'a' twice", None,
    ),
    "duplicate field": (
        b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        DATA, r"names 'dtype' twice", None,
    ),
    "duplicate metadata": (
        b'{"__metadata__": {}, "__metadata__": {}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        DATA, r"names '__metadata__' twice", None,
    ),
    "entry not an object": ({"a": [1, 2]}, DATA, r"entry is a list, not an object", "a"),
    "no dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, DATA, r"no 'dtype'", "a"),
    "no shape": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, DATA, r"no 'shape'", "a"),
    "no offsets": ({"a": {"dtype": "F32", "shape": [2]}}, DATA, r"no 'data_offsets'", "a"),
    "unknown dtype": (with_a(dtype="F33"), DATA, r"dtype 'F33' is not one hostd.loader reads",
                      "a"),
    "lower-case dtype": (with_a(dtype="f32"), DATA, r"dtype 'f32' is not one", "a"),
    "dtype a number": (with_a(dtype=4), DATA, r"dtype an int is not one", "a"),
    "negative dim": (with_a(shape=[-2]), DATA, r"shape has -2, not an int", "a"),
    "float dim": (with_a(shape=[2.0]), DATA, r"shape has 2.0, not an int", "a"),
    "bool dim": (with_a(shape=[True, 2]), DATA, r"shape has True, not an int", "a"),
    "huge dim": (with_a(shape=[2**64]), DATA, r"shape has 18446744073709551616, not an int",
                 "a"),
    "shape not a list": (with_a(shape=2), DATA, r"shape is an int, not a list", "a"),
    "overflowing shape": (with_a(shape=[2**62, 2**62]), DATA, r"needs \d+ bytes", "a"),
    "offsets past the data": (with_a(data_offsets=[0, 9]), DATA,
                              r"data_offsets \[0, 9\] are not within the 8-byte data", "a"),
    "offsets reversed": (with_a(data_offsets=[8, 0]), DATA, r"\[8, 0\] are not within", "a"),
    "negative offset": (with_a(data_offsets=[-8, 0]), DATA, r"are not within", "a"),
    "three offsets": (with_a(data_offsets=[0, 8, 8]), DATA, r"not two ints", "a"),
    "float offsets": (with_a(data_offsets=[0, 8.0]), DATA, r"not two ints", "a"),
    "size mismatch": (with_a(shape=[3]), DATA, r"shape \[3\] of F32 needs 12 bytes, but "
                      r"data_offsets \[0, 8\] hold 8", "a"),
    "empty shape but bytes": (with_a(shape=[0]), DATA, r"needs 0 bytes", "a"),
    "overlap": (
        {"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        DATA, r"\[4, 8\] overlap tensor 'a', which ends at 8", "b",
    ),
    "empty tensor inside another": (
        {"a": F32x2, "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}},
        DATA, r"overlap tensor 'a'", "z",
    ),
    "gap": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
         "b": {"dtype": "U8", "shape": [3], "data_offsets": [5, 8]}},
        DATA, r"leave a gap: bytes \[4, 5\)", "b",
    ),
    "gap at the start": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, DATA,
                         r"leave a gap: bytes \[0, 4\)", "a"),
    "trailing bytes": (BASE, DATA + b"\0", r"last 1 of the data section's 9 bytes belong to no",
                       None),
    "bytes but no tensors": ({}, b"\0\0", r"last 2 of the data section's 2 bytes", None),
    "metadata not an object": ({"__metadata__": ["k"], "a": F32x2}, DATA,
                               r"__metadata__ is a list, not an object", None),
    "metadata value an int": ({"__metadata__": {"k": 1}, "a": F32x2}, DATA,
                              r"__metadata__\['k'\] is an int, not a string", None),
    "metadata value null": ({"__metadata__": {"k": None}, "a": F32x2}, DATA,
                            r"__metadata__\['k'\] is null, not a string", None),
}  # fmt: skip
# The reference keeps the last of two entries of one name (here identical); hostd refuses a
# name given twice, whatever the entries.
REFERENCE_ACCEPTS = {"duplicate tensor names"}


def build(tmp_path: Path, header: Any, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return write_raw(tmp_path / "bad.safetensors", raw, data)


def test_the_base_file_loads(tmp_path: Path) -> None:
    path = build(tmp_path, BASE, DATA)
    assert same(loader.load_file(path)["a"], np.zeros(2, np.float32))
    assert same(reference_load_file(path)["a"], np.zeros(2, np.float32))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_header_is_refused(tmp_path: Path, case: str) -> None:
    header, data, message, tensor = HOSTILE[case]
    path = build(tmp_path, header, data)
    with pytest.raises(LoaderError, match=message) as info:
        loader.read_header(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.tensor == tensor
    if tensor is not None:
        assert f"tensor {tensor!r}: " in str(info.value)
    with pytest.raises(LoaderError, match=message):
        loader.load_file(path)
    if case not in REFERENCE_ACCEPTS:
        with pytest.raises(safetensors.SafetensorError):
            reference_load_file(path)


def test_the_header_length_is_checked(tmp_path: Path) -> None:
    header = json.dumps(BASE).encode()
    past_end = write_raw(tmp_path / "past.safetensors", header, DATA, length=len(header) + 9)
    with pytest.raises(LoaderError, match=r"header length \d+ runs past the end of the \d+-byte"):
        loader.read_header(past_end)
    huge = write_raw(tmp_path / "huge.safetensors", header, DATA, length=100_000_001)
    with pytest.raises(LoaderError, match="header length 100000001 is over the limit"):
        loader.read_header(huge)
    top = write_raw(tmp_path / "top.safetensors", header, DATA, length=2**64 - 1)
    with pytest.raises(LoaderError, match="is over the limit"):
        loader.load_file(top)
    empty = write_raw(tmp_path / "empty.safetensors", b"", DATA)
    with pytest.raises(LoaderError, match="the header is not valid JSON"):
        loader.read_header(empty)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x02\0\0")
    with pytest.raises(LoaderError, match="3 bytes is too short for a safetensors file"):
        loader.read_header(short)
    for path in (past_end, huge, empty, short):
        with pytest.raises(safetensors.SafetensorError):
            reference_load_file(path)


def test_what_the_reference_accepts_loads(tmp_path: Path) -> None:
    """Padding around the JSON, unknown fields, null metadata, empty tensors sharing an offset:
    all valid to the reference, so valid here."""
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": {"x": [1.5]}}
    header = {
        "__metadata__": None,
        "e1": {"dtype": "BF16", "shape": [0], "data_offsets": [8, 8]},
        "a": a,
        "e2": {"dtype": "I8", "shape": [3, 0], "data_offsets": [8, 8]},
        "e0": {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]},
    }
    path = write_raw(
        tmp_path / "ok.safetensors", b"  " + json.dumps(header).encode() + b"   ", DATA
    )
    got = loader.load_file(path)
    assert set(got) == {"a", "e0", "e1", "e2"}
    assert got["e2"].shape == (3, 0)
    assert got["e1"].dtype == ml_dtypes.bfloat16
    assert loader.read_header(path).metadata == {}
    assert set(reference_load_file(path)) == set(got)


def test_a_long_name_is_cut_short_in_the_message(tmp_path: Path) -> None:
    name = "x" * 10_000
    path = build(tmp_path, {name: {**F32x2, "dtype": "F33"}}, DATA)
    with pytest.raises(LoaderError) as info:
        loader.read_header(path)
    assert "... (10000 chars)" in str(info.value)
    assert len(str(info.value)) < 500
    assert info.value.tensor == name


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"")
    with pytest.raises(LoaderError, match=r"nests too deeply|not valid JSON|\d+ JSON arrays"):
        loader.read_header(path)


def test_a_file_that_shrinks_while_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_file({"w": np.arange(100, dtype=np.float32)}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        header = loader._read_header(fd, str(path))
        os.truncate(path, path.stat().st_size - 10)
        with pytest.raises(LoaderError, match=r"ends at byte \d+, before the header says"):
            loader._numpy_tensors(fd, header, 1, str(path))
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_files_fail_only_with_loader_error(data: st.DataObject) -> None:
    """Flip, cut or extend a valid file's bytes anywhere: LoaderError or a valid load, never
    another exception."""
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "w": np.arange(6, dtype=np.float16).reshape(2, 3),
        "b": np.arange(3, dtype=np.int8),
    }
    raw = bytearray(reference_save(tensors, metadata={"m": "1"}))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    end = data.draw(st.sampled_from(["keep", "cut", "extend"]))
    if end == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif end == "extend":
        raw += bytes(data.draw(st.integers(1, 3)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.safetensors"
        path.write_bytes(raw)
        with contextlib.suppress(LoaderError):
            loader.load_file(path)


# -- arguments, frameworks and devices ----------------------------------------------------------


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.safetensors"
    save_file({"w": np.arange(6, dtype=np.float32), "h": np.ones(2, ml_dtypes.bfloat16)}, str(path))
    return path


def test_bad_arguments_are_usage_errors(small_file: Path) -> None:
    with pytest.raises(UsageError, match="framework 'jax'"):
        loader.load_file(small_file, framework="jax")
    with pytest.raises(UsageError, match=r"numpy arrays live in host memory.*framework='torch'"):
        loader.load_file(small_file, device="cuda")
    with pytest.raises(UsageError, match="threads=0"):
        loader.load_file(small_file, threads=0)
    with pytest.raises(FileNotFoundError):
        loader.load_file(small_file.with_name("missing.safetensors"))


def test_without_torch_the_torch_framework_says_what_to_install(
    small_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as if missing
    for device in ("cpu", "cuda"):
        with pytest.raises(LoaderUnavailable, match=r"PyTorch.*not installed.*hostd\[torch\]"):
            loader.load_file(small_file, framework="torch", device=device)


def test_without_ml_dtypes_bf16_says_what_to_install(
    small_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f32 = tmp_path / "f32.safetensors"
    save_file({"w": np.arange(3, dtype=np.float32)}, str(f32))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(LoaderUnavailable, match=r"tensor 'h' is BF16.*ml_dtypes.*hostd\[loader\]"):
        loader.load_file(small_file)
    assert same(loader.load_file(f32)["w"], np.arange(3, dtype=np.float32))


def test_importing_the_loader_imports_no_numpy_and_nothing_imports_it() -> None:
    code = (
        "import sys, hostd.loader; print(sorted({'numpy', 'ml_dtypes', 'torch'} & {*sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
    modules = (p for p in (ROOT / "hostd").rglob("*.py") if p.name != "loader.py")
    assert [str(p.relative_to(ROOT)) for p in modules if imports_loader(p)] == []


def imports_loader(path: Path) -> bool:
    """Whether the module at `path` imports hostd.loader (by any spelling)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name == "hostd.loader" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "hostd.loader" or (module.endswith("loader") and node.level):
                return True
            if module in ("hostd", "") and any(a.name == "loader" for a in node.names):
                return True
    return False


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install 'hostd[torch]')")
def test_torch_tensors_on_the_cpu(tmp_path: Path) -> None:
    import torch

    tensors = {code.lower(): arrays_of(code, i) for i, code in enumerate(NUMPY)}
    tensors["scalar"] = np.array(1.25, dtype=ml_dtypes.bfloat16)
    tensors["empty"] = np.zeros((0, 3), dtype=np.float16)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    got = loader.load_file(path, framework="torch")
    for name, want in tensors.items():
        t = got[name]
        code = name.upper() if name.upper() in NUMPY else None
        if code is not None and getattr(torch, loader.DTYPES[code].torch, None) is None:
            continue  # this torch lacks the dtype (uint16-64 before torch 2.3)
        assert isinstance(t, torch.Tensor), name
        assert t.device.type == "cpu", name
        assert tuple(t.shape) == want.shape, name
        assert t.is_contiguous(), name
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert raw == want.tobytes(), name
    assert got["bf16"].dtype == torch.bfloat16
    assert got["f8_e4m3"].dtype == torch.float8_e4m3fn


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install 'hostd[torch]')")
def test_cuda_without_a_gpu_says_so(small_file: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    with pytest.raises(LoaderUnavailable, match=r"device 'cuda'.*(CPU-only build|no GPU)"):
        loader.load_file(small_file, framework="torch", device="cuda")
    with pytest.raises(UsageError, match="'cpu' or 'cuda"):
        loader.load_file(small_file, framework="torch", device="meta")
    with pytest.raises(UsageError, match="not a device name torch knows"):
        loader.load_file(small_file, framework="torch", device="gpu!")


def cuda_available() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not cuda_available(), reason="needs torch with a CUDA device")
def test_torch_tensors_on_a_cuda_device(tmp_path: Path) -> None:
    import torch

    odd = np.arange(3, dtype=np.int8)
    f64 = np.arange(2, dtype=np.float64)
    header = {
        "odd": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
        "f64": {"dtype": "F64", "shape": [2], "data_offsets": [3, 19]},  # unaligned
        "bf": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [19, 27]},
        "none": {"dtype": "F32", "shape": [0], "data_offsets": [27, 27]},
    }
    bf = np.arange(4, dtype=ml_dtypes.bfloat16).reshape(2, 2)
    path = write_header(
        tmp_path / "g.safetensors", header, odd.tobytes() + f64.tobytes() + bf.tobytes()
    )
    got = loader.load_file(path, framework="torch", device="cuda")
    for t in got.values():
        assert t.device.type == "cuda"
    assert got["odd"].cpu().tolist() == [0, 1, 2]
    assert got["f64"].cpu().tolist() == [0.0, 1.0]
    assert got["bf"].dtype == torch.bfloat16
    assert got["bf"].float().cpu().tolist() == [[0, 1], [2, 3]]
    assert tuple(got["none"].shape) == (0,)


@pytest.mark.skipif(not cuda_available(), reason="needs torch with a CUDA device")
def test_a_cuda_load_through_many_staging_pieces_lands_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging ring turned over many times (pieces far smaller than the tensors, and not
    a divisor of them), with a tensor that straddles pieces and one that a writer left
    unaligned: every byte on the device is the file's."""
    import torch

    monkeypatch.setattr(loader, "STAGE_BYTES", 4096 + 8)
    monkeypatch.setattr(loader, "STAGES", 2)
    rng = np.random.default_rng(5)
    tensors = {
        f"t{i}": rng.standard_normal(int(n)).astype(np.float32)
        for i, n in enumerate(rng.integers(1, 20_000, size=12))
    }
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    got = loader.load_file(path, framework="torch", device="cuda", threads=3)
    assert list(got) == list(reference_load_file(path))
    for name, arr in tensors.items():
        assert got[name].device.type == "cuda", name
        assert got[name].dtype == torch.float32, name
        assert got[name].cpu().numpy().tobytes() == arr.tobytes(), name


@pytest.mark.skipif(not cuda_available(), reason="needs torch with a CUDA device")
def test_a_cuda_load_whose_read_fails_stops_every_reader_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "STAGE_BYTES", 4096)
    path = tmp_path / "big.safetensors"
    save_file({"x": np.zeros(64 * 1024, dtype=np.float32)}, str(path))
    real = loader._read_run
    reads: list[int] = []
    lock = threading.Lock()

    def shrunk(fd: int, offset: int, bufs: list[memoryview], where: str) -> None:
        with lock:
            reads.append(offset)
        if len(reads) == 5:  # as a file cut short under the reader
            raise LoaderError(where, f"the file ends at byte {offset}")
        real(fd, offset, bufs, where)

    monkeypatch.setattr(loader, "_read_run", shrunk)
    with pytest.raises(LoaderError, match="the file ends at byte"):
        loader.load_file(path, framework="torch", device="cuda", threads=4)
    assert len(reads) < 5 + 4 * loader.STAGES  # the others stopped at their next piece


def test_reprs_summarise(small_file: Path) -> None:
    header = loader.read_header(small_file)
    assert repr(header).startswith("Header(2 tensors, 28 bytes of data at ")
    assert isinstance(loader.LoaderError("f", "x"), ValueError)


# -- headers built to hurt the loader rather than to be read ------------------------------


@pytest.mark.parametrize("shape", [[0, 2**63 - 1], [0, 2**32, 2**32], [0, *[2**62] * 40]])
def test_an_empty_tensor_too_big_to_index_is_refused(tmp_path: Path, shape: list[int]) -> None:
    """Zero bytes, so its span checks out, but no array of that shape can be made: the
    loader's error naming it, not numpy's bare ValueError."""
    path = build(tmp_path, {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b"")
    with pytest.raises(LoaderError, match=r"tensor 'a': .*(spans over 2\*\*63|cannot make)"):
        loader.load_file(path)


def test_deep_nesting_is_refused_whatever_the_recursion_limit(tmp_path: Path) -> None:
    """ML programs raise the recursion limit; the parser then recursed until the C stack
    overflowed (SIGSEGV) on a 4 MB header of nested brackets."""
    depth = 2_000_000
    path = build(tmp_path, b'{"a":' + b"[" * depth + b"]" * depth + b"}", b"")
    code = (
        "import sys; sys.setrecursionlimit(10**7)\n"
        "from hostd import loader\n"
        f"try: loader.read_header({str(path)!r})\n"
        "except loader.LoaderError as e: print(e); sys.exit(3)\n"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert got.returncode == 3, (got.returncode, got.stderr[-500:])
    assert "nests too deeply" in got.stdout


@pytest.mark.parametrize("item", [b"{}", b'{"ab":"cd"}'])
def test_a_header_of_many_objects_is_refused_before_they_are_built(
    tmp_path: Path, item: bytes
) -> None:
    """{"x": [{}, {}, ...]}: each `{}` a dict, and 100 MB of them gigabytes of memory (2.6
    GB, against 1.1 for the reference); no header holds more objects than one for every 40
    of its bytes, and the parse stops at the first over that."""
    path = build(tmp_path, b'{"x":[' + (item + b",") * 300_000 + item + b"]}", b"")
    with pytest.raises(LoaderError, match=r"holds over \d+ JSON objects"):
        loader.read_header(path)


def test_a_header_of_many_arrays_is_refused_before_they_are_built(tmp_path: Path) -> None:
    """A tensor entry may carry fields the loader ignores: `"junk": [[],[],...]` made each
    `[]` a list, 100 MB of them 2.7 GB (the reference: 1.1). No header holds more arrays
    than two for every 40 of its bytes (a tensor's shape and offsets); a valid one beside
    them still loads."""
    entry = b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "junk": ['
    path = build(tmp_path, b'{"a":' + entry + b"[]," * 300_000 + b"[]]}}", DATA)
    with pytest.raises(LoaderError, match=r"holds \d+ JSON arrays, over \d+"):
        loader.read_header(path)
    fine = build(tmp_path, b'{"a":' + entry + b"[1, 2], [3]]}}", DATA)
    assert list(loader.load_file(fine)) == ["a"]


@pytest.mark.parametrize("piece", [b"\\\\", b'\\"', b'", "'])
def test_the_header_checks_take_memory_in_proportion_to_the_header(piece: bytes) -> None:
    """The checks before the parse (arrays counted, nesting measured) looked at the header
    with regexes that made an object of each escape or string: a valid 100 MB header of one
    metadata value of escaped backslashes took 4.1 GB. Here a 20 MB one, with tracemalloc
    watching (numpy reports its buffers to it): a few times the header at most."""
    value = piece * (20_000_000 // len(piece))
    raw = b'{"__metadata__": {"k": "' + value + b'"}, "a": ' + json.dumps(F32x2).encode() + b"}"
    tracemalloc.start()
    try:
        loader.parse_header(raw, 8 + len(raw), len(DATA), "x")
        _, peak = tracemalloc.get_traced_memory()
    except loader.LoaderError:  # (the list of strings: refused, as the reference does)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * len(raw), f"{peak / len(raw):.1f} times the header"


def _arrays_and_depth(value: Any, level: int = 0) -> tuple[int, int]:
    """What the header checks must find in json.dumps(value): its lists, its deepest nesting."""
    if isinstance(value, list):
        found = [_arrays_and_depth(v, level + 1) for v in value]
        return 1 + sum(f[0] for f in found), max([level + 1, *(f[1] for f in found)])
    if isinstance(value, dict):
        found = [_arrays_and_depth(v, level + 1) for v in value.values()]
        return sum(f[0] for f in found), max([level + 1, *(f[1] for f in found)])
    return 0, level


_TRICKY = st.text(alphabet='[]{}"\\ab,:\n', max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY, inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_the_header_checks_count_arrays_and_nesting_outside_strings(
    value: Any, ascii_only: bool
) -> None:
    """Brackets, quotes and backslashes inside strings (escaped as JSON writes them) are not
    JSON's own: the checks before the parse must count exactly the parser's arrays and
    depth, or a valid header is refused."""
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert loader._brackets(raw) == _arrays_and_depth(value)


@pytest.mark.parametrize("where", ["name", "metadata"])
def test_a_lone_surrogate_is_refused(tmp_path: Path, where: str) -> None:
    raw = (
        b'{"\\udc00w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
        if where == "name"
        else b'{"__metadata__": {"k": "\\ud800"}, "a": {"dtype": "F32", "shape": [2], '
        b'"data_offsets": [0, 8]}}'
    )
    path = build(tmp_path, raw, DATA)
    with pytest.raises(LoaderError, match="not valid Unicode"):
        loader.load_file(path)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the reference refuses it too
        reference_load_file(str(path))


def test_what_is_not_a_regular_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(LoaderError, match=r"dir\.safetensors: is a directory"):
        loader.load_file(tmp_path / "dir.safetensors")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # an open of it for reading would wait for a writer for ever
    with pytest.raises(LoaderError, match=r"fifo\.safetensors: is not a regular file"):
        loader.read_header(fifo)
