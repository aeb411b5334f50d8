"""Load a safetensors file into arrays: the header parsed and checked by hand, no pickle ever.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON (tensor
name -> {"dtype", "shape", "data_offsets": [begin, end]}, and an optional "__metadata__" map
of strings), then the data section, which the tensors' offsets index. `read_header` checks
the header as an attacker could have written it, with the rules of the reference
implementation (huggingface/safetensors): a bounded header inside the file; JSON with no
duplicate keys and no NaN; known dtypes; shapes of non-negative ints; each tensor's byte
span exactly shape x itemsize; spans that tile the data section with no gap, overlap or
trailing byte. Unknown fields in a tensor's entry are ignored, as the reference ignores them.
Every breach is one `LoaderError` naming the file, the tensor and what is wrong.

`load_file` returns arrays that own memory filled from the file (never lazy mmap views: when
it returns, the bytes are in memory). On the CPU each tensor gets its own allocation, so
dropping one frees it; a CUDA load's tensors are views of one device allocation per file.
The data section is read with preadv(2) straight into those buffers (many small tensors
share one call), in pieces of 16 MiB handed to a few threads: a read from the page cache is
a memory copy, and one thread's copy is slower than the memory (bench/loader_cpu.py: on 2
cores, 2 threads loaded a warm file 1.3x as fast as one, and 3x as fast as
safetensors.numpy.load_file; on 16 cores, 8 threads 2.3x as fast as one, and 4x). Not mmap:
a file truncated under a mapping kills the process with SIGBUS, where a short read is an
error.

numpy, ml_dtypes (for BF16 and F8) and torch are imported when a call needs them, never when
this module is imported, and no other hostd module imports this one.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import os
import queue
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

from hostd.errors import HostdError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import numpy as np
    from numpy.typing import NDArray

StrPath = str | os.PathLike[str]

MAX_HEADER = 100_000_000  # the reference's limit
MAX_DIMS = 64  # numpy's most dimensions
PIECE = 16 << 20  # bytes per preadv: a thread's unit of work
_MAX_DIM = 2**63 - 1  # a dimension numpy and torch can index
_IOV_MAX = 1024  # buffers per preadv (Linux's IOV_MAX)
# The default's cap. On a 16-core H200 host, 8 threads loaded warm files onto the GPU at 18
# GiB/s against 12.5 for 4 (the page cache read 21.6 GiB/s on 8), and into numpy at 5.5
# GiB/s against 4.7 (bench/RESULTS.md); 12 and 16 added under 10%.
_MAX_THREADS = 8
# A CUDA load's reading threads each stage through this many pinned host buffers of this
# size, with a stream of its own (bench/loader_gpu.py).
STAGES = 2
STAGE_BYTES = 8 << 20


class LoaderError(HostdError, ValueError):
    """The file is not a valid safetensors file. The message names the file, the tensor when
    one is at fault, and what is wrong."""

    code = "bad_safetensors"
    status = 422

    def __init__(self, where: str, what: str, tensor: str | None = None) -> None:
        super().__init__(
            f"{where}: {what}" if tensor is None else f"{where}: tensor {_show(tensor)}: {what}"
        )
        self.path = where
        self.tensor = tensor


class LoaderUnavailable(HostdError, RuntimeError):
    """What the call asks for needs something this host lacks: a package (numpy, ml_dtypes,
    torch) or a CUDA device. The message says what to install or what is missing."""

    code = "loader_unavailable"
    status = 501


class _Dtype(NamedTuple):
    itemsize: int
    numpy: str  # a numpy dtype string, or the name of an ml_dtypes type
    torch: str  # the name of the torch dtype


DTYPES: dict[str, _Dtype] = {
    "F64": _Dtype(8, "<f8", "float64"),
    "F32": _Dtype(4, "<f4", "float32"),
    "F16": _Dtype(2, "<f2", "float16"),
    "BF16": _Dtype(2, "bfloat16", "bfloat16"),
    "F8_E4M3": _Dtype(1, "float8_e4m3fn", "float8_e4m3fn"),
    "F8_E5M2": _Dtype(1, "float8_e5m2", "float8_e5m2"),
    "C64": _Dtype(8, "<c8", "complex64"),
    "I64": _Dtype(8, "<i8", "int64"),
    "I32": _Dtype(4, "<i4", "int32"),
    "I16": _Dtype(2, "<i2", "int16"),
    "I8": _Dtype(1, "i1", "int8"),
    "U64": _Dtype(8, "<u8", "uint64"),
    "U32": _Dtype(4, "<u4", "uint32"),
    "U16": _Dtype(2, "<u2", "uint16"),
    "U8": _Dtype(1, "u1", "uint8"),
    "BOOL": _Dtype(1, "?", "bool"),
}


class TensorInfo(NamedTuple):
    """One tensor of the header: its dtype code ("F16", "BF16", ...), its shape, and its byte
    span [begin, end) in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    """A checked header: the tensors in file order, the metadata, and where the data section
    lies in the file (it runs from data_start to the end of the file)."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    data_start: int
    data_size: int

    def __repr__(self) -> str:
        return (
            f"Header({len(self.tensors)} tensors, {self.data_size} bytes of data at "
            f"{self.data_start}, metadata keys {sorted(self.metadata)})"
        )


# -- the header: pure checks --------------------------------------------------------------------


def _show(text: str | None, limit: int = 80) -> str:
    """A name for a message: quoted, and cut short when an attacker made it long."""
    text = text or ""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an int", float: "a float"}


def _kind(value: object) -> str:
    """What a JSON value is, for a message."""
    if value is None:
        return "null"
    return _KINDS.get(type(value), "a boolean" if isinstance(value, bool) else "a value")


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """N from the file's first 8 bytes, checked against the limit and the file's size."""
    if file_size < 8 or len(prefix) < 8:
        raise LoaderError(where, f"{file_size} bytes is too short for a safetensors file")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER:
        raise LoaderError(where, f"header length {n} is over the limit of {MAX_HEADER} bytes")
    if 8 + n > file_size:
        raise LoaderError(
            where, f"header length {n} runs past the end of the {file_size}-byte file"
        )
    return n


def parse_header(raw: bytes, data_start: int, data_size: int, where: str) -> Header:
    """Check the header's JSON `raw` against a data section of `data_size` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoaderError(where, f"the header is not UTF-8 ({e})") from e
    # A tensor's entry takes 40 bytes at the least ({"dtype":"U8","shape":[],"data_offsets":
    # [0,0]} and its name), with two arrays in it: a header of more objects than that is
    # refused as they are made, not after a 100 MB header of `{}`s has become gigabytes of
    # dicts; one of more arrays (`[],[],...` in a field the loader ignores: 2.7 GB for
    # 100 MB) before it is parsed.
    most_objects = 2 + len(raw) // 40
    objects = 0
    arrays, deepest = _brackets(raw)
    if deepest > NESTING and sys.getrecursionlimit() > SAFE_RECURSION:
        # (the parser recurses: past this limit it overflows the C stack before it fails)
        raise LoaderError(where, f"the header's JSON nests too deeply (over {NESTING})")
    if arrays > 2 * most_objects:
        raise LoaderError(where, f"the header holds {arrays} JSON arrays, over {2 * most_objects}")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal objects
        objects += 1
        if objects > most_objects:
            raise LoaderError(where, f"the header holds over {most_objects} JSON objects")
        obj = dict(pairs)
        if len(obj) != len(pairs):  # the rare case: find the key given twice
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise LoaderError(where, f"the header names {_show(key)} twice")
                seen.add(key)
        return obj

    def no_constant(name: str) -> Any:
        raise LoaderError(where, f"the header is not valid JSON: {name} is not a JSON value")

    try:
        obj = json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)
    except LoaderError:
        raise
    except RecursionError as e:
        raise LoaderError(where, "the header's JSON nests too deeply") from e
    except ValueError as e:  # JSONDecodeError, or an integer of too many digits
        raise LoaderError(where, f"the header is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise LoaderError(where, f"the header is {_kind(obj)}, not a JSON object")

    metadata = _metadata(obj.pop("__metadata__", None), where)
    for text in (*obj, *metadata, *metadata.values()):
        _check_text(text, where)
    tensors = [_tensor(name, entry, data_size, where) for name, entry in obj.items()]
    tensors.sort(key=attrgetter("begin", "end"))
    pos, prev = 0, ""
    for t in tensors:
        if t.begin < pos:
            raise LoaderError(
                where,
                f"data_offsets [{t.begin}, {t.end}] overlap tensor {_show(prev)}, "
                f"which ends at {pos}",
                t.name,
            )
        if t.begin > pos:
            raise LoaderError(
                where,
                f"data_offsets [{t.begin}, {t.end}] leave a gap: bytes [{pos}, {t.begin}) "
                "of the data section belong to no tensor",
                t.name,
            )
        pos, prev = t.end, t.name
    if pos != data_size:
        raise LoaderError(
            where,
            f"the last {data_size - pos} of the data section's {data_size} bytes belong "
            "to no tensor (trailing bytes after the last tensor)",
        )
    return Header({t.name: t for t in tensors}, metadata, data_start, data_size)


# A header nests 3 deep (the object, an entry, its shape); unknown fields of an entry may
# hold more, and the reference's parser stops at 128. This depth no C stack minds.
NESTING = 64
# Up to this recursion limit, json's own RecursionError comes long before the C stack ends
# (Python's default is 1,000; a 2,000,000-deep header was refused cleanly at 50,000).
SAFE_RECURSION = 20_000
_NOT_SHAPE = bytes(b for b in range(256) if b not in b'"[]{}')  # what translate drops
_SLICE = 1 << 22  # bytes of brackets and quotes looked at a time


def _brackets(raw: bytes) -> tuple[int, int]:
    """(arrays, deepest nesting) of JSON `raw`, outside its strings, in bounded memory and
    without a Python step per byte or an object per match: a regex over a 100 MB header of
    escapes or tiny strings made an object of each (4 GB). Escapes go first (each escaped
    backslash, then each escaped quote, left to right as a parser reads them), then all but
    quotes and brackets; a bracket is outside every string where the quotes up to it are
    even in number."""
    import numpy as np

    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = raw.translate(None, _NOT_SHAPE)
    arrays = deepest = depth = odd = 0
    for at in range(0, len(kept), _SLICE):
        a = np.frombuffer(kept, np.uint8, min(_SLICE, len(kept) - at), at)
        quote = a == 0x22
        out = a[((np.cumsum(quote, dtype=np.uint8) + odd) & 1 == 0) & ~quote]
        opens = (out == 0x5B) | (out == 0x7B)
        arrays += int(np.count_nonzero(out == 0x5B))
        if out.size:
            level = np.cumsum(opens.astype(np.int32) * 2 - 1, dtype=np.int64) + depth
            deepest, depth = max(deepest, int(level.max())), int(level[-1])
        odd = (odd + int(np.count_nonzero(quote))) & 1
    return arrays, deepest


def _check_text(text: str, where: str) -> None:
    """A name or metadata string must be Unicode that UTF-8 can hold: JSON's \\u escapes
    can spell a lone surrogate, which no program could print or save again."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LoaderError(
            where,
            f"{_show(text.encode('utf-8', 'backslashreplace').decode())} is not valid "
            "Unicode (a lone surrogate)",
        ) from None


def _metadata(value: object, where: str) -> dict[str, str]:
    if value is None:  # the reference reads null as no metadata
        return {}
    if not isinstance(value, dict):
        raise LoaderError(where, f"__metadata__ is {_kind(value)}, not an object of strings")
    for key, v in value.items():
        if not isinstance(v, str):
            raise LoaderError(where, f"__metadata__[{_show(key)}] is {_kind(v)}, not a string")
    return value


def _tensor(name: str, entry: object, data_size: int, where: str) -> TensorInfo:
    # exact type checks: JSON gives exactly dict, list, str and int (bool is not an int here)
    if type(entry) is not dict:
        raise LoaderError(where, f"its entry is {_kind(entry)}, not an object", name)
    try:
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except KeyError as e:
        raise LoaderError(where, f"its entry has no {e.args[0]!r}", name) from None
    dtype = DTYPES.get(code) if type(code) is str else None
    if dtype is None:
        shown = _show(code) if type(code) is str else _kind(code)
        raise LoaderError(
            where, f"dtype {shown} is not one hostd.loader reads ({' '.join(DTYPES)})", name
        )
    if type(shape) is not list or len(shape) > MAX_DIMS:
        what = f"{len(shape)} dimensions" if type(shape) is list else _kind(shape)
        raise LoaderError(where, f"shape is {what}, not a list of at most {MAX_DIMS} ints", name)
    need = dtype.itemsize  # at most 64 factors under 2**63: a small big integer at worst
    span = dtype.itemsize  # the same without the zeros: numpy and torch refuse over 2**63
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise LoaderError(where, f"shape has {dim!r:.40}, not an int in [0, 2**63)", name)
        need *= dim
        span *= dim or 1
    if need == 0 and span > _MAX_DIM:  # (else the bytes it needs say what is wrong)
        raise LoaderError(
            where, f"shape {shape} of {code} spans over 2**63 bytes (a zero in it or not)", name
        )
    if type(offsets) is not list or len(offsets) != 2 or not all(type(x) is int for x in offsets):
        raise LoaderError(where, f"data_offsets is {offsets!r:.80}, not two ints", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise LoaderError(
            where,
            f"data_offsets [{begin}, {end}] are not within the {data_size}-byte data "
            "section (0 <= begin <= end <= size)",
            name,
        )
    if need != end - begin:
        raise LoaderError(
            where,
            f"shape {shape} of {code} needs {need} bytes, but data_offsets [{begin}, {end}] "
            f"hold {end - begin}",
            name,
        )
    return TensorInfo(name, code, tuple(shape), begin, end)


# -- the file ---------------------------------------------------------------------------------


def read_header(path: StrPath) -> Header:
    """The checked header of the safetensors file at `path`. LoaderError if it is not one;
    OSError if it cannot be opened or read."""
    fd = _open_regular(path)
    try:
        return _read_header(fd, os.fspath(path))
    finally:
        os.close(fd)


def _open_regular(path: StrPath) -> int:
    """`path` opened for reading, if it is a regular file: a FIFO would block the open (and
    a device's reads never end), a directory's read fails with no name to it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise LoaderError(os.fspath(path), f"is {kind}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_header(fd: int, where: str) -> Header:
    file_size = os.fstat(fd).st_size
    n = header_length(os.pread(fd, 8, 0), file_size, where)
    raw = bytearray(n)
    if n:
        _read_run(fd, 8, [memoryview(raw)], where)
    return parse_header(bytes(raw), 8 + n, file_size - 8 - n, where)


@overload
def load_file(
    path: StrPath,
    *,
    device: str = ...,
    framework: Literal["numpy"] = ...,
    threads: int | None = ...,
) -> dict[str, NDArray[Any]]: ...


@overload
def load_file(
    path: StrPath, *, device: str = ..., framework: str, threads: int | None = ...
) -> dict[str, Any]: ...


def load_file(
    path: StrPath, *, device: str = "cpu", framework: str = "numpy", threads: int | None = None
) -> dict[str, Any]:
    """Every tensor of the safetensors file at `path`, by name, in file order.

    framework="numpy": numpy arrays (BF16 and F8 as ml_dtypes types), each owning its memory;
    device must be "cpu". framework="torch": torch tensors on `device` ("cpu", "cuda",
    "cuda:N"). For a CUDA device the data section is read by `threads` readers, each through
    pinned host buffers of its own, copied to the device on a stream of its own while it
    reads its next piece, into one device allocation the tensors are views of (a writer's
    unaligned tensor is cloned); the tensors are on the device when this returns. On an H200
    host: 18 GiB/s from the page cache, 3-5x safetensors.torch.load_file (bench/loader_gpu.py).

    `threads`: how many threads read at once (default: the usable CPUs, at most 8).
    LoaderError for a file that is not valid safetensors; LoaderUnavailable when numpy,
    ml_dtypes, torch or CUDA is missing; UsageError for an unknown framework or device;
    OSError when the file cannot be opened or read.
    """
    if framework not in ("numpy", "torch"):
        raise UsageError(f"framework {framework!r}: hostd.loader gives 'numpy' or 'torch'")
    if framework == "numpy" and device != "cpu":
        raise UsageError(
            f"device {device!r}: numpy arrays live in host memory; for a GPU ask for "
            "framework='torch' (pip install 'hostd[torch]')"
        )
    if threads is None:
        threads = min(_MAX_THREADS, len(os.sched_getaffinity(0)))
    if threads < 1:
        raise UsageError(f"threads={threads}: at least 1")
    torch: Any = None
    torch_device: Any = None
    if framework == "torch":  # checked before the file is opened: a missing GPU fails fast
        torch = _import_torch()
        torch_device = _torch_device(torch, device)
    where = os.fspath(path)
    fd = _open_regular(path)
    try:
        header = _read_header(fd, where)
        with contextlib.suppress(OSError):  # advice only
            # twice the readahead: a load that missed the page cache ran up to 4x as fast
            # with it here, and never slower (disk figures on this VM vary run to run)
            os.posix_fadvise(fd, header.data_start, header.data_size, os.POSIX_FADV_SEQUENTIAL)
        if torch is None:
            return _numpy_tensors(fd, header, threads, where)
        if torch_device.type == "cpu":
            return _torch_cpu(torch, fd, header, threads, where)
        return _torch_staged(torch, torch_device, fd, header, threads, where)
    finally:
        os.close(fd)


# -- numpy and torch ------------------------------------------------------------------------


def _numpy_tensors(fd: int, header: Header, threads: int, where: str) -> dict[str, Any]:
    out, dests = _numpy_arrays(header, where)
    _read_all(fd, header.data_start, dests, threads, where)
    return out


def _numpy_arrays(header: Header, where: str) -> tuple[dict[str, Any], list[memoryview]]:
    """An empty array for each tensor, by name, and their bytes, in file order."""
    try:
        import numpy as np
    except ImportError as e:
        raise LoaderUnavailable(
            "hostd.loader needs numpy, which is not installed: pip install 'hostd[loader]'"
        ) from e
    dtypes = {code: _numpy_dtype(header, code, where) for code in _codes(header)}
    out: dict[str, Any] = {}
    dests: list[memoryview] = []
    for t in header.tensors.values():
        with _allocating(where, t):
            arr = np.empty(t.shape, dtypes[t.dtype])
        out[t.name] = arr
        dests.append(arr.reshape(-1).view(np.uint8).data)
    return out, dests


@contextlib.contextmanager
def _allocating(where: str, t: TensorInfo) -> Iterator[None]:
    """A shape the header allows but this numpy or torch cannot make (more dimensions than
    it has, a size it cannot index): said as the loader's error, naming the tensor. Running
    out of memory is not the file's fault, and is left as it is."""
    try:
        yield
    except (ValueError, RuntimeError) as e:
        if "out of memory" in str(e).lower():
            raise
        raise LoaderError(
            where, f"cannot make an array of shape {list(t.shape)}: {e}", t.name
        ) from e


def _codes(header: Header) -> list[str]:
    return sorted({t.dtype for t in header.tensors.values()})


def _numpy_dtype(header: Header, code: str, where: str) -> np.dtype[Any]:
    import numpy as np

    spec = DTYPES[code].numpy
    if spec[0] in "<iu?":
        return np.dtype(spec)
    try:
        import ml_dtypes
    except ImportError as e:
        first = next(t.name for t in header.tensors.values() if t.dtype == code)
        raise LoaderUnavailable(
            f"{where}: tensor {_show(first)} is {code}, which numpy reads only with the "
            "ml_dtypes package, not installed here: pip install 'hostd[loader]'"
        ) from e
    return np.dtype(getattr(ml_dtypes, spec))  # type: ignore[no-any-return]


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise LoaderUnavailable(
            "framework='torch' needs PyTorch, which is not installed here: "
            "pip install 'hostd[torch]'"
        ) from e
    return torch


def _torch_device(torch: Any, device: str) -> Any:
    """The torch device for `device`, checked to exist here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"device {device!r} is not a device name torch knows: {e}") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UsageError(f"device {device!r}: hostd.loader loads onto 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build, without CUDA"
        else:
            why = f"torch (CUDA {torch.version.cuda}) finds no GPU or no working CUDA driver"
        raise LoaderUnavailable(f"device {device!r}: {why} (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise LoaderUnavailable(f"device {device!r}: this host has {count} CUDA device(s)")
    return dev


def _torch_cpu(torch: Any, fd: int, header: Header, threads: int, where: str) -> dict[str, Any]:
    out, dests = _torch_cpu_tensors(torch, header, where)
    _read_all(fd, header.data_start, dests, threads, where)
    return out


def _torch_cpu_tensors(
    torch: Any, header: Header, where: str
) -> tuple[dict[str, Any], list[memoryview]]:
    """An empty CPU tensor for each tensor, by name, and their bytes, in file order."""
    dtypes = {code: _torch_dtype(torch, header, code, where) for code in _codes(header)}
    out: dict[str, Any] = {}
    dests: list[memoryview] = []
    for t in header.tensors.values():
        with _allocating(where, t):
            tensor = torch.empty(t.shape, dtype=dtypes[t.dtype])
        out[t.name] = tensor
        dests.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return out, dests


def _torch_staged(
    torch: Any, device: Any, fd: int, header: Header, threads: int, where: str
) -> dict[str, Any]:
    """The data section to `device` in pieces of STAGE_BYTES, by `threads` readers: each
    reads every threads-th piece into pinned host buffers of its own (STAGES, in turn) and
    copies it to the device on a CUDA stream of its own while it reads its next (a buffer is
    reused once its copy's event has fired). The pieces land in one device allocation, of
    which each tensor is a view.

    A reader per stream, rather than one reading loop feeding a ring: the host side's copy
    out of the page cache is the slow half (a thread moved 4.5 GiB/s on an H200 host, whose
    link took 52 GiB/s pinned), so it must run on several threads at once, each overlapping
    its reads with its own copies to the device."""
    dtypes = {code: _torch_dtype(torch, header, code, where) for code in _codes(header)}
    size = header.data_size
    on_device = torch.empty(size, dtype=torch.uint8, device=device)
    piece = max(1, min(STAGE_BYTES, size))
    offsets = range(0, size, piece)
    readers = max(1, min(threads, len(offsets)))
    # on_device came from the calling thread's current stream's pool: each reader waits for it
    made = torch.cuda.current_stream(device)
    stop = threading.Event()

    def read(first: int) -> None:
        mine = offsets[first::readers]
        ring = [
            torch.empty(piece, dtype=torch.uint8, pin_memory=True)
            for _ in range(min(STAGES, len(mine)))
        ]
        views = [memoryview(buf.numpy()) for buf in ring]
        copied: list[Any] = [None] * len(ring)  # each buffer's last copy, as a CUDA event
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(made)
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                for i, off in enumerate(mine):
                    if stop.is_set():
                        return
                    k = i % len(ring)
                    if copied[k] is not None:
                        copied[k].synchronize()  # its last piece is on the device
                    n = min(piece, size - off)
                    _read_run(fd, header.data_start + off, [views[k][:n]], where)
                    on_device[off : off + n].copy_(ring[k][:n], non_blocking=True)
                    copied[k] = torch.cuda.Event()
                    copied[k].record(stream)
        finally:
            stream.synchronize()  # on the device when we return; the buffers free

    if readers == 1:
        read(0)
    else:
        with ThreadPoolExecutor(readers, thread_name_prefix="hostd-loader") as pool:
            futures = [pool.submit(read, first) for first in range(readers)]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                stop.set()  # (after an error: the other readers stop at their next piece)
            for future in futures:
                future.result()
    out: dict[str, Any] = {}
    for t in header.tensors.values():
        dtype = dtypes[t.dtype]
        if t.nbytes == 0:
            with _allocating(where, t):
                out[t.name] = torch.empty(t.shape, dtype=dtype, device=device)
            continue
        raw = on_device[t.begin : t.end]
        if t.begin % DTYPES[t.dtype].itemsize:
            raw = raw.clone()  # a writer left it unaligned; a torch dtype view needs alignment
        out[t.name] = raw.view(dtype).reshape(t.shape)
    return out


def _torch_dtype(torch: Any, header: Header, code: str, where: str) -> Any:
    name = DTYPES[code].torch
    dtype = getattr(torch, name, None)
    if dtype is None:
        first = next(t.name for t in header.tensors.values() if t.dtype == code)
        raise LoaderUnavailable(
            f"{where}: tensor {_show(first)} is {code}, and this torch ({torch.__version__}) "
            f"has no torch.{name}"
        )
    return dtype


# -- reading --------------------------------------------------------------------------------


def _read_all(fd: int, start: int, dests: Sequence[memoryview], threads: int, where: str) -> None:
    """Fill `dests`, which the file's bytes from `start` fill back to back."""
    runs = _runs(start, dests)
    if threads == 1 or len(runs) <= 1:
        for offset, bufs in runs:
            _read_run(fd, offset, bufs, where)
        return
    with ThreadPoolExecutor(min(threads, len(runs)), thread_name_prefix="hostd-loader") as pool:
        futures = [pool.submit(_read_run, fd, offset, bufs, where) for offset, bufs in runs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # the queued ones; the pool waits for those running
            raise


def _runs(start: int, dests: Sequence[memoryview]) -> list[tuple[int, list[memoryview]]]:
    """Cut the bytes `dests` take into runs of at most PIECE bytes and _IOV_MAX buffers: each
    one preadv. Many small tensors share a run; a big one spans several."""
    runs: list[tuple[int, list[memoryview]]] = []
    bufs: list[memoryview] = []
    size = 0
    for dest in dests:
        done = 0
        while done < len(dest):
            take = min(len(dest) - done, PIECE - size)
            bufs.append(dest[done : done + take])
            done += take
            size += take
            if size == PIECE or len(bufs) == _IOV_MAX:
                runs.append((start, bufs))
                start += size
                bufs, size = [], 0
    if bufs:
        runs.append((start, bufs))
    return runs


def _read_run(fd: int, offset: int, bufs: list[memoryview], where: str) -> None:
    """Fill `bufs` from the file's bytes at `offset`; a short read resumes where it stopped."""
    i = 0
    while i < len(bufs):
        got = os.preadv(fd, bufs[i:], offset)
        if got == 0:
            raise LoaderError(
                where,
                f"the file ends at byte {offset}, before the header says: it shrank "
                "while being read",
            )
        offset += got
        while i < len(bufs) and got >= len(bufs[i]):
            got -= len(bufs[i])
            i += 1
        if got:
            bufs[i] = bufs[i][got:]


# -- a snapshot, loaded as it arrives ---------------------------------------------------------

SHARDS = ("*.safetensors",)  # the default load order: the shards first, in path order
TAKE_BACK_WAIT = 10.0  # seconds a failed load waits for the daemon to take its target back


def load_safetensors(
    ref: str,
    *,
    device: str = "cpu",
    framework: str = "numpy",
    target: StrPath | None = None,
    socket: StrPath | None = None,
    mode: str = "auto",
    compat: Mapping[str, str] | None = None,
    order: Sequence[str] = SHARDS,
    threads: int | None = None,
    on_file: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every tensor of every `.safetensors` file of snapshot `ref`, by name: a state dict.

    The snapshot is restored progressively (hostd's `file` events) into `target`, and each
    shard is loaded (`load_file`) as soon as it lands, while the later ones are still being
    fetched: the time to a loaded model approaches the larger of the fetch and the load
    rather than their sum. Into host memory (numpy, or torch on "cpu") a shard is read even
    as it arrives, a run at a time as hostd says its chunks are written (`ranges`: its
    `range` events), so the fetch's end leaves one run to read, not a shard; such shards
    are copies, not links, unless their blobs were cached already. `order` (paths or globs)
    is the load order, which is also the fetch priority. Every byte read was verified by
    hostd against the snapshot's chunk ids before it was told of; each shard's size is
    checked against its event, and its header (dtypes, shapes, offsets) as `load_file`
    checks it. A `.safetensors` symlink of the snapshot (a hub cache's layout, names linking
    to blobs) is loaded through, once its target has landed, if it stays inside the
    snapshot; a file reached twice is loaded once.

    `target`: where the files land, kept. None: a temporary directory, removed before this
    returns, each shard as soon as it is loaded (the arrays own their memory), on /dev/shm
    where there is one (the default `mem` tier's filesystem, so `mode="auto"` can link
    rather than copy). `socket`: the
    daemon's (default as the CLI finds it). `on_file`: each `file` event, as it arrives.

    Raises the restore's error (hostd.errors) if it fails, LoaderError for a bad shard or a
    tensor name found in two shards, and what `load_file` raises. A failure stops the
    restore and removes what it placed: the daemon does, or this call where the restore had
    already ended (a bad last shard).
    """
    if framework not in ("numpy", "torch"):
        raise UsageError(f"framework {framework!r}: hostd.loader gives 'numpy' or 'torch'")
    if framework == "torch":  # fail before any byte moves
        _torch_device(_import_torch(), device)
    elif device != "cpu":
        raise UsageError(
            f"device {device!r}: numpy arrays live in host memory; for a GPU ask for "
            "framework='torch' (pip install 'hostd[torch]')"
        )
    from hostd.client import Client, resolve_socket

    if threads is None:
        threads = min(_MAX_THREADS, len(os.sched_getaffinity(0)))
    if threads < 1:
        raise UsageError(f"threads={threads}: at least 1")
    allocate: Allocate | None = None  # on the CPU, shards are read as their chunks land
    if framework == "numpy":
        allocate = _numpy_arrays
    elif device == "cpu":
        allocate = functools.partial(_torch_cpu_tensors, _import_torch())

    with contextlib.ExitStack() as stack:
        scratch = target is None
        if target is None:
            # (a late link of a failed restore must not turn the cleanup into the error)
            target = stack.enter_context(
                tempfile.TemporaryDirectory(
                    prefix="hostd-load-",
                    dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    ignore_cleanup_errors=True,
                )
            )
        root = os.fspath(target)
        made = not os.path.lexists(root)  # (the restore makes it: a failed load removes it)
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        client = stack.enter_context(Client(resolve_socket(socket, os.environ)))

        def restore() -> None:
            try:
                result = client.restore(
                    ref,
                    root,
                    mode=mode,
                    compat=compat,
                    progressive=True,
                    order=list(order),
                    on_file=lambda e: events.put(("file", e)),
                    ranges=allocate is not None,
                    on_range=lambda e: events.put(("range", e)),
                )
            except BaseException as e:  # handed to the loading thread, raised there
                events.put(("error", e))
            else:
                events.put(("result", result))

        pool = stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="hostd-loader"))
        arriving: dict[str, _Arriving] = {}  # shards being read as they land
        landed_first: set[str] = set()  # shards whose scratch file had gone when first told
        stack.callback(_close_all, arriving)
        worker = threading.Thread(target=restore, name="hostd-load-restore", daemon=True)
        worker.start()
        shards: dict[str, dict[str, Any]] = {}
        loaded: set[str] = set()  # the real paths of the shards loaded
        placed: list[str] = []  # what the restore said it placed, as far as read
        ended = False  # its result was read
        inside = os.path.realpath(root)
        try:
            while True:
                kind, item = events.get()
                if kind == "error":
                    raise item
                if kind == "result":
                    ended = True
                    break
                if kind == "range":
                    path = str(item["path"])
                    if allocate is not None and path.endswith(".safetensors"):
                        a = arriving.get(path)
                        if a is None and path not in landed_first:
                            size, part = int(item["size"]), str(item["part"])
                            try:
                                a = _Arriving(root, path, part, size, allocate, pool)
                            except FileNotFoundError:
                                # It landed before its first range was read (this thread
                                # was loading another): read whole at its file event.
                                landed_first.add(path)
                            else:
                                arriving[path] = a
                        if a is not None:
                            a.add(int(item["offset"]), int(item["length"]))
                    continue
                placed.append(str(item["path"]))
                if on_file is not None:
                    on_file(item)
                path = str(item["path"])
                if not path.endswith(".safetensors"):
                    continue
                where = os.path.join(root, path)
                real = os.path.realpath(where)
                if "symlink" in item:  # (a hub cache's layout: snapshot names -> blobs)
                    if os.path.commonpath([real, inside]) != inside:
                        raise LoaderError(
                            where, "links outside the snapshot: hostd did not verify it"
                        )
                elif os.stat(where).st_size != item["size"]:
                    raise LoaderError(where, f"is not the {item['size']} bytes hostd placed")
                if real in loaded:  # a file and a link to it: loaded once
                    continue
                a = arriving.pop(path, None)
                if a is not None:
                    shards[path] = a.landed_whole(int(item["size"]))
                else:
                    try:
                        shards[path] = load_file(
                            real, device=device, framework=framework, threads=threads
                        )
                    except OSError as e:
                        if "symlink" not in item:
                            raise
                        # a link of the snapshot's that loops, or leads nowhere
                        raise LoaderError(
                            where, f"links to {item['symlink']!r}: {e.strerror or e}"
                        ) from e
                loaded.add(real)
                if scratch and "symlink" not in item:  # its bytes are in the arrays now
                    os.unlink(where)
            if not shards:
                raise LoaderError(ref, "the snapshot has no .safetensors file")
            return _merged(shards)
        except BaseException:
            # The daemon sees the caller go, stops, and removes what it placed; the rest of
            # its events are read meanwhile (a cut would drop them unread) ...
            client.stop()
            worker.join()
            if not scratch:  # ... unless it had placed all of it already: then, we do
                rest, result = _placed_in(events)
                _take_back(root, [*placed, *rest], made)
                if made and not (ended or result):
                    # the daemon's removal runs on after the call's end: wait for it
                    _gone(root, TAKE_BACK_WAIT)
            raise
        finally:
            worker.join()


if TYPE_CHECKING:
    # A header's tensors, made empty, by name, and their bytes in file order.
    Allocate = Callable[[Header, str], tuple[dict[str, Any], list[memoryview]]]


class _Arriving:
    """A shard read as its chunks land (`range` events of a progressive restore with
    `ranges`): the bytes of its scratch file that hostd says are written and verified are
    read into its tensors on `pool`, a run (PIECE bytes at most) at a time as soon as
    everything under the run has landed; the rest once the file has landed whole."""

    def __init__(
        self, root: str, path: str, part: str, size: int, allocate: Allocate, pool: Executor
    ) -> None:
        self.where = os.path.join(root, path)
        scratch = os.path.normpath(os.path.join(root, part))
        if os.path.dirname(scratch) != os.path.dirname(os.path.normpath(self.where)):
            raise LoaderError(self.where, f"hostd named a scratch file {part!r} beside no file")
        self.fd = _open_regular(scratch)
        self.size = size
        self.allocate, self.pool = allocate, pool
        self.landed: list[tuple[int, int]] = []  # [start, end) written, merged, in order
        self.header: Header | None = None
        self.out: dict[str, Any] = {}
        self.runs: list[tuple[int, int, list[memoryview]]] = []  # (start, end, bufs) unread
        self.reads: list[Future[None]] = []

    def add(self, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) are written: read what they complete."""
        i = bisect.bisect_left(self.landed, (offset, offset))
        self.landed.insert(i, (offset, offset + length))
        merged: list[tuple[int, int]] = []
        for a, b in self.landed:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.landed = merged
        if self.header is None and not self._read_header():
            return
        self._read(lambda start, end: self._covered(start, end))

    def _covered(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.landed, (start, sys.maxsize)) - 1
        return i >= 0 and self.landed[i][0] <= start and end <= self.landed[i][1]

    def _read_header(self) -> bool:
        """The header, parsed once its bytes have landed; whether it has."""
        if not self._covered(0, 8):
            return False
        n = header_length(os.pread(self.fd, 8, 0), self.size, self.where)
        if not self._covered(0, 8 + n):
            return False
        raw = bytearray(n)
        if n:
            _read_run(self.fd, 8, [memoryview(raw)], self.where)
        self._begin(parse_header(bytes(raw), 8 + n, self.size - 8 - n, self.where))
        return True

    def _begin(self, header: Header) -> None:
        self.header = header
        self.out, dests = self.allocate(header, self.where)
        for start, bufs in _runs(header.data_start, dests):
            self.runs.append((start, start + sum(map(len, bufs)), bufs))

    def _read(self, ready: Callable[[int, int], bool]) -> None:
        left = []
        for run in self.runs:
            start, end, bufs = run
            if ready(start, end):
                self.reads.append(self.pool.submit(_read_run, self.fd, start, bufs, self.where))
            else:
                left.append(run)
        self.runs = left

    def landed_whole(self, size: int) -> dict[str, Any]:
        """The file has landed whole (its scratch file renamed in, `size` bytes): read the
        rest, wait for every read, and hand over the tensors."""
        try:
            st, ours = os.stat(self.where, follow_symlinks=False), os.fstat(self.fd)
        except OSError as e:
            raise LoaderError(self.where, f"is not there once landed ({e})") from e
        if (st.st_dev, st.st_ino) != (ours.st_dev, ours.st_ino) or size != self.size:
            raise LoaderError(self.where, "is not the file hostd wrote its ranges into")
        if ours.st_size != size:
            raise LoaderError(self.where, f"is not the {size} bytes hostd placed")
        if self.header is None:
            self._begin(_read_header(self.fd, self.where))
        self._read(lambda start, end: True)
        try:
            for read in self.reads:
                read.result()
        finally:
            self.close()
        return self.out

    def close(self) -> None:
        """Stop: the reads not begun are dropped, those running waited for, the file closed."""
        for read in self.reads:
            read.cancel()
        wait(self.reads)
        self.reads = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _close_all(arriving: Mapping[str, _Arriving]) -> None:
    for a in arriving.values():
        a.close()


def _gone(path: str, seconds: float) -> None:
    """Wait until nothing is at `path`, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while os.path.lexists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def _placed_in(events: queue.Queue[tuple[str, Any]]) -> tuple[list[str], bool]:
    """The paths of the `file` events not read yet (the call has ended), and whether its
    result was among them."""
    out = []
    result = False
    while not events.empty():
        kind, item = events.get_nowait()
        if kind == "file":
            out.append(str(item["path"]))
        result = result or kind == "result"
    return out, result


def _take_back(root: str, paths: Sequence[str], made: bool) -> None:
    """Remove what a restore whose shards failed to load placed in `root` (each file, then
    each directory it leaves empty, then `root` if the restore made it), where the daemon
    did not (the restore had ended). Whatever else is there stays."""
    dirs: set[str] = set()
    for path in paths:
        with contextlib.suppress(OSError):
            where = os.path.join(root, path)
            if not stat.S_ISDIR(os.lstat(where).st_mode):
                os.unlink(where)
        parent = os.path.dirname(path)
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for d in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(root, d))
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(root)


def _merged(shards: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One state dict from the shards' (in path order); a name in two shards is an error."""
    out: dict[str, Any] = {}
    came_from: dict[str, str] = {}
    for path in sorted(shards):
        for name, tensor in shards[path].items():
            if name in out:
                raise LoaderError(path, f"also in {came_from[name]}", name)
            out[name] = tensor
            came_from[name] = path
    return out
