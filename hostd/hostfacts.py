"""This host's own facts: architecture, kernel, format, and its GPUs as NVML tells them.

`detect()` runs once at daemon start. It imports pynvml there and only there, so importing
hostd never loads NVML. The facts feed compat digests (docs/FORMAT.md section 7), so their
spelling is a contract; each is `none` where this host cannot tell. Nothing here may stop the
daemon: without NVML, or when NVML fails, the GPU facts are `none` and `nvml` says why. NVML
errors never leave this module.

NVML can hang (a GPU fallen off the bus makes its calls take seconds, or never return), so the
daemon never waits on it unbounded, and never on the event loop:
- `detect_bounded(timeout)` runs `detect()` on a daemon thread of its own and waits at most
  `timeout` seconds; past that the GPU facts are `none` until hostd restarts, and a detection
  that finishes late is dropped (its NVML shut down). The daemon reads the bound from the
  environment variable HOSTD_NVML_TIMEOUT (seconds, default DETECT_TIMEOUT: `detect_timeout`).
- `GpuMemory` keeps each GPU's last memory reading for /metrics, refreshed on a daemon thread,
  one refresh at a time; a GPU whose reading goes unanswered for that same bound is left out
  of the scrape rather than shown frozen.
- `HostFacts.close()` waits at most CLOSE_WAIT for a reading still in NVML before giving up.
A thread that may hang forever is never one that anybody joins: not asyncio's default
executor, whose shutdown would wait for it.

NVML stays initialised for the daemon's life so that /metrics can ask each device's memory;
`close()` shuts it down.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from hostd.core import compat
from hostd.core.compat import UNKNOWN

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
GPU_FACTS = tuple(sorted(compat.GPU_FACTS))
NO_LIBRARY = "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this host"

TIMEOUT_ENV = "HOSTD_NVML_TIMEOUT"
DETECT_TIMEOUT = 10.0  # seconds NVML may take to answer: at start, and for a memory reading
REFRESH_AFTER = 1.0  # seconds a memory reading serves scrapes before one starts a new one
CLOSE_WAIT = 2.0  # seconds close() waits for a reading still in NVML


@dataclass(frozen=True)
class Gpu:
    """One device as NVML saw it at start. `name` is "" and `memory_total` 0 where NVML could
    not tell; `uuid` "" likewise. `mig`: "on", "off", "unsupported" (a GPU without MIG), or
    "none" (NVML failed to say)."""

    index: int
    name: str
    uuid: str
    memory_total: int  # bytes
    mig: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Reading = tuple[Gpu, int, int]  # a device, its used bytes, its total bytes


@dataclass(frozen=True, repr=False)
class HostFacts:
    """What `detect()` found: the compat facts, whether NVML answered, and the devices.
    `readings`: each device's memory as detection read it; `timeout`: how long hostd waits for
    NVML to answer (detection's bound, and a memory reading's: see GpuMemory)."""

    facts: dict[str, str]
    nvml: str  # "ok", or why the GPU facts are unknown
    gpus: tuple[Gpu, ...] = ()
    readings: tuple[Reading, ...] = field(default=(), compare=False)
    timeout: float = field(default=DETECT_TIMEOUT, compare=False)
    _session: _Session | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        f = self.facts
        return (
            f"HostFacts({f.get('arch')}, {f.get('gpu_count')} x {f.get('gpu_model')}, "
            f"nvml={self.nvml!r})"
        )

    def readable(self) -> tuple[Gpu, ...]:
        """The devices NVML gave a handle for: those whose memory can be asked."""
        s = self._session
        return () if s is None else tuple(g for g in self.gpus if g.index in s.handles)

    def read_memory(self, gpu: Gpu) -> tuple[int, int] | None:
        """One device's (used, total) bytes now, asked of NVML (blocking: it may hang); None
        when NVML cannot tell (lost, no handle, closed)."""
        return None if self._session is None else self._session.read(gpu.index)

    def memory(self) -> list[Reading]:
        """Each device's (gpu, used bytes, total bytes) now, asked of NVML; [] without it.
        Blocking: never on the event loop (GpuMemory is for that)."""
        return [(g, *r) for g in self.readable() if (r := self.read_memory(g)) is not None]

    def close(self) -> None:
        """Shut NVML down (once; later calls do nothing). Waits at most CLOSE_WAIT for a
        reading still in NVML."""
        if self._session is not None:
            self._session.close()

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": dict(self.facts),
            "nvml": self.nvml,
            "gpus": [g.to_json() for g in self.gpus],
        }


class _Session:
    """NVML, initialised, with each device's handle.

    One call through it at a time (`lock`), and none after close: a reading on a refresh
    thread and the shutdown at close must not cross. The lock is only ever taken off the
    event loop, and close() takes it with a bound since the call holding it may never return.
    """

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml
        self.handles: dict[int, Any] = {}
        self.open = True
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"_Session({len(self.handles)} devices, {'open' if self.open else 'closed'})"

    def read(self, index: int) -> tuple[int, int] | None:
        handle = self.handles.get(index)
        if handle is None:
            return None
        with self.lock:
            if not self.open:
                return None
            try:
                m = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except self.nvml.NVMLError as e:
                # One device failing (lost, reset) must not fail the scrape of the others.
                log.debug("GPU %d: no memory reading from NVML: %s", index, e)
                return None
        return int(m.used), int(m.total)

    def close(self, wait: float = CLOSE_WAIT) -> None:
        if not self.open:
            return
        if not self.lock.acquire(timeout=wait):
            # A call that has not returned in this long may never: leave NVML as it is (the
            # process is going) rather than hang the daemon's stop. No call starts after this:
            # each looks at `open` under the lock first.
            self.open = False
            log.warning("NVML has not answered a call for over %g s: not shutting it down", wait)
            return
        try:
            if not self.open:
                return
            self.open = False
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError as e:
                log.warning("NVML shutdown failed: %s", e)
        finally:
            self.lock.release()


class GpuMemory:
    """Each GPU's memory as NVML last told it, for /metrics to read on the event loop without
    ever calling NVML there.

    `latest()` answers at once from what the last refresh read (at first, what detection
    read). When that is `refresh_after` seconds old and no refresh is under way, it starts one
    on a daemon thread of its own: one at a time, so a hung NVML holds one thread, not one per
    scrape. A scrape so shows the reading that an earlier scrape started: the values lag by up
    to one scrape interval. A refresh stores each device's reading as it comes. A device NVML
    fails to read (lost) is left out at once; one that the refresh under way has not read for
    `stale_after` seconds is left out too (its gauges vanish rather than stay frozen) until
    NVML answers again.

    `idle` is set while no refresh runs (for tests, which wait on it with a bound).
    """

    def __init__(
        self,
        gpus: Sequence[Gpu],
        read: Callable[[Gpu], tuple[int, int] | None],
        readings: Sequence[Reading] = (),
        *,
        stale_after: float = DETECT_TIMEOUT,
        refresh_after: float = REFRESH_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gpus = tuple(gpus)
        self.read = read  # blocking, and may never return: only ever called on our thread
        self.stale_after = stale_after
        self.refresh_after = refresh_after
        self.clock = clock
        self.idle = threading.Event()
        self.idle.set()
        # Taken on the event loop, so held only for a few dict operations, never across a read.
        self._lock = threading.Lock()
        self._last: dict[int, Reading] = {r[0].index: r for r in readings}
        self._read_at = clock()  # when the reading shown was started (detection's: now)
        self._since: float | None = None  # when the refresh under way started
        self._answered: set[int] = set()  # the devices it has read so far
        self._stalled = False  # it was found stalled (and that logged)

    @classmethod
    def of(cls, host: HostFacts, **kw: Any) -> GpuMemory:
        """The devices of `host` that NVML can read, starting from detection's reading."""
        return cls(host.readable(), host.read_memory, host.readings, stale_after=host.timeout, **kw)

    def __repr__(self) -> str:
        since = self._since
        state = "idle" if since is None else f"refreshing for {self.clock() - since:.1f}s"
        return f"GpuMemory({len(self.gpus)} GPUs, {len(self._last)} read, {state})"

    def latest(self) -> list[Reading]:
        """The last reading of each device that has one; starts a refresh when it is due.
        Never blocks on NVML."""
        now = self.clock()
        with self._lock:
            start = (
                self._since is None
                and bool(self.gpus)
                and now - self._read_at >= self.refresh_after
            )
            if start:
                self._since = now
                self.idle.clear()
            waited = 0.0 if self._since is None else now - self._since
            stalled = self._since is not None and waited >= self.stale_after
            newly_stalled = stalled and not self._stalled
            self._stalled |= stalled
            out = [r for i, r in sorted(self._last.items()) if not stalled or i in self._answered]
        if newly_stalled:
            log.warning(
                "NVML has not answered a GPU memory reading for %.1f s: leaving out the "
                "gauges of GPUs %s until it does",
                waited,
                sorted({g.index for g in self.gpus} - {r[0].index for r in out}),
            )
        if start:
            try:
                threading.Thread(
                    target=self._refresh, args=(now,), name="hostd-gpu-memory", daemon=True
                ).start()
            except RuntimeError as e:  # no thread to be had now: a later scrape tries again
                log.warning("cannot start a GPU memory reading: %s", e)
                self._finish(self._read_at)
        return out

    def _refresh(self, since: float) -> None:
        try:
            for gpu in self.gpus:
                reading = self.read(gpu)  # seconds, or forever, when NVML hangs
                with self._lock:
                    if reading is None:
                        self._last.pop(gpu.index, None)
                    else:
                        self._last[gpu.index] = (gpu, *reading)
                    self._answered.add(gpu.index)
        except Exception:  # a supervision point: one failed refresh must not stop the next
            log.exception("GPU memory reading failed")
        finally:
            self._finish(since)

    def _finish(self, since: float) -> None:
        with self._lock:
            stalled = self._stalled
            self._since, self._read_at, self._stalled = None, since, False
            self._answered.clear()
            self.idle.set()
        if stalled:
            log.warning("NVML answered the GPU memory reading again")


def detect() -> HostFacts:
    """This host's facts, NVML left initialised when present. Blocking, without a bound
    (NVML may hang: the daemon calls `detect_bounded`); never raises."""
    base = compat.basic_facts()
    try:
        import pynvml
    except ImportError:
        host = _without(base, "pynvml not installed")
    else:
        try:
            host = _detect(pynvml, base)
        except Exception as e:  # a supervision point: detection must never stop the daemon
            log.exception("GPU detection failed")
            host = _without(base, f"GPU detection failed: {type(e).__name__}: {e}")
    if host.nvml == "ok":
        log.info("host %s", ", ".join(f"{k}={v}" for k, v in host.facts.items()))
    else:
        known = ", ".join(f"{k}={v}" for k, v in base.items())
        log.info("host %s; no GPU facts: %s", known, host.nvml)
    return host


def detect_timeout(environ: Mapping[str, str]) -> float:
    """How long the daemon waits for NVML: HOSTD_NVML_TIMEOUT's seconds where it is set to a
    positive number, else DETECT_TIMEOUT."""
    raw = environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DETECT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        log.warning(
            "%s=%r is not a positive number of seconds: using %g", TIMEOUT_ENV, raw, DETECT_TIMEOUT
        )
        return DETECT_TIMEOUT
    return seconds


def detect_bounded(
    timeout: float = DETECT_TIMEOUT, *, detector: Callable[[], HostFacts] = detect
) -> HostFacts:
    """`detect()` on a daemon thread of its own, waited for at most `timeout` seconds. Past
    that the GPU facts are `none`, `nvml` says NVML did not answer, and the detection is
    abandoned: if it finishes later, its facts are dropped and its NVML shut down. Blocking,
    but not much past `timeout`; never raises."""
    handoff = _Handoff(detector, timeout)
    threading.Thread(target=handoff.run, name="hostd-nvml-detect", daemon=True).start()
    host = handoff.take()
    if host is None:
        why = f"NVML did not answer within {timeout:g} s; GPU facts unknown until hostd restarts"
        log.warning("%s", why)
        return dataclasses.replace(_without(compat.basic_facts(), why), timeout=timeout)
    return dataclasses.replace(host, timeout=timeout)


class _Handoff:
    """One detection's result, handed from its thread to the waiter unless the waiter gave up
    first. Whichever comes second, under `lock`, decides: the waiter takes the facts, or the
    thread closes them."""

    def __init__(self, detector: Callable[[], HostFacts], timeout: float) -> None:
        self.detector = detector
        self.timeout = timeout
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.host: HostFacts | None = None
        self.abandoned = False

    def __repr__(self) -> str:
        state = "abandoned" if self.abandoned else "done" if self.done.is_set() else "running"
        return f"_Handoff({state}, timeout={self.timeout:g})"

    def run(self) -> None:
        started = time.monotonic()
        host = self.detector()
        with self.lock:
            late = self.abandoned
            if not late:
                self.host = host
        self.done.set()
        if late:
            log.warning(
                "NVML answered %.1f s after detection started, past the %g s bound: dropping "
                "what it found (%r) and shutting it down; GPU facts stay unknown until hostd "
                "restarts",
                time.monotonic() - started,
                self.timeout,
                host,
            )
            host.close()

    def take(self) -> HostFacts | None:
        self.done.wait(self.timeout)
        with self.lock:
            if self.host is None:
                self.abandoned = True
            return self.host


def _without(base: dict[str, str], why: str) -> HostFacts:
    return HostFacts(dict(sorted({**base, **dict.fromkeys(GPU_FACTS, UNKNOWN)}.items())), why)


def _detect(nv: ModuleType, base: dict[str, str]) -> HostFacts:
    try:
        nv.nvmlInit()
    except nv.NVMLError_LibraryNotFound:
        return _without(base, NO_LIBRARY)
    except nv.NVMLError as e:
        return _without(base, f"NVML init failed: {e}")
    session = _Session(nv)
    try:
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as e:
            session.close()
            return _without(base, f"NVML cannot count the GPUs: {e}")
        gpus = []
        readings: list[Reading] = []
        for index in range(count):
            gpu, handle, used = _device(nv, index)
            gpus.append(gpu)
            if handle is not None:
                session.handles[index] = handle
            if used is not None:
                readings.append((gpu, used, gpu.memory_total))
        driver = _ask(nv, "the driver version", lambda: str(nv.nvmlSystemGetDriverVersion()), "")
        cuda = _ask(nv, "the CUDA version", lambda: _cuda_version(nv), 0)
    except BaseException:
        session.close()
        raise
    facts = {**base, **gpu_facts(gpus, driver, cuda)}
    return HostFacts(
        dict(sorted(facts.items())), "ok", tuple(gpus), readings=tuple(readings), _session=session
    )


def _device(nv: ModuleType, index: int) -> tuple[Gpu, Any, int | None]:
    """One device's record, handle (None when NVML gives none) and used memory (None when
    NVML cannot tell)."""
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
    except nv.NVMLError as e:
        log.warning("GPU %d: NVML gives no handle: %s", index, e)
        return Gpu(index, "", "", 0, UNKNOWN), None, None
    name = _ask(nv, f"GPU {index}'s name", lambda: str(nv.nvmlDeviceGetName(handle)), "")
    uuid = _ask(nv, f"GPU {index}'s UUID", lambda: str(nv.nvmlDeviceGetUUID(handle)), "")
    memory = _ask(nv, f"GPU {index}'s memory", lambda: _memory_info(nv, handle), None)
    used, total = memory if memory is not None else (None, 0)
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(handle)
        mig = "on" if current == nv.NVML_DEVICE_MIG_ENABLE else "off"
    except nv.NVMLError_NotSupported:
        mig = "unsupported"  # a GPU without MIG: counts as off
    except nv.NVMLError as e:
        log.warning("GPU %d: NVML cannot tell its MIG mode: %s", index, e)
        mig = UNKNOWN
    return Gpu(index, name, uuid, total, mig), handle, used


def _memory_info(nv: ModuleType, handle: Any) -> tuple[int, int] | None:
    m = nv.nvmlDeviceGetMemoryInfo(handle)
    return int(m.used), int(m.total)


def _ask(nv: ModuleType, what: str, call: Callable[[], T], unknown: T) -> T:
    """One NVML reading, or `unknown` (logged) when NVML fails to give it."""
    try:
        return call()
    except nv.NVMLError as e:
        log.warning("NVML cannot tell %s: %s", what, e)
        return unknown


def _cuda_version(nv: ModuleType) -> int:
    try:
        return int(nv.nvmlSystemGetCudaDriverVersion_v2())
    except nv.NVMLError_FunctionNotFound:  # drivers before CUDA 10.1
        return int(nv.nvmlSystemGetCudaDriverVersion())


# -- the facts from what NVML said: pure ---------------------------------------------------------


def gpu_facts(gpus: Sequence[Gpu], driver: str, cuda: int) -> dict[str, str]:
    """The GPU facts, spelled as docs/FORMAT.md section 7 has them. `driver` "" and `cuda` 0
    when NVML did not tell them. A fact any device could not tell is `none`."""
    names = {g.name for g in gpus}
    totals = {g.memory_total for g in gpus}
    return {
        "gpu_model": "+".join(sorted(names)) if gpus and "" not in names else UNKNOWN,
        "gpu_count": str(len(gpus)),
        "gpu_memory": (
            "+".join(str(m) for m in sorted({t // MiB for t in totals}))
            if gpus and 0 not in totals
            else UNKNOWN
        ),
        "mig": mig_fact([g.mig for g in gpus]),
        "driver": driver or UNKNOWN,
        "driver_major": driver.split(".")[0] if driver else UNKNOWN,
        "cuda": cuda_fact(cuda),
    }


def mig_fact(modes: Sequence[str]) -> str:
    """ "on" when MIG is on in every device, "off" when in none, else "mixed"."""
    if not modes or UNKNOWN in modes:
        return UNKNOWN
    on = sum(m == "on" for m in modes)
    return "on" if on == len(modes) else "off" if on == 0 else "mixed"


def cuda_fact(version: int) -> str:
    """NVML's CUDA driver version (1000 * major + 10 * minor) as "major.minor": 12040 -> 12.4."""
    return f"{version // 1000}.{(version % 1000) // 10}" if version > 0 else UNKNOWN
