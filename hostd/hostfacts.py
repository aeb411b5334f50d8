"""This host's own facts: architecture, kernel, format, and its GPUs as NVML tells them.

`detect()` runs once at daemon start (blocking: call it in a thread). It imports pynvml there
and only there, so importing hostd never loads NVML. The facts feed compat digests
(docs/FORMAT.md section 7), so their spelling is a contract; each is `none` where this host
cannot tell. Nothing here may stop the daemon: without NVML, or when NVML fails, the GPU facts
are `none` and `nvml` says why. NVML errors never leave this module.

NVML stays initialised for the daemon's life so that /metrics can ask each device's memory
at scrape time (`HostFacts.memory`); `close()` shuts it down.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True, repr=False)
class HostFacts:
    """What `detect()` found: the compat facts, whether NVML answered, and the devices."""

    facts: dict[str, str]
    nvml: str  # "ok", or why the GPU facts are unknown
    gpus: tuple[Gpu, ...] = ()
    _session: _Session | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        f = self.facts
        return (
            f"HostFacts({f.get('arch')}, {f.get('gpu_count')} x {f.get('gpu_model')}, "
            f"nvml={self.nvml!r})"
        )

    def memory(self) -> list[tuple[Gpu, int, int]]:
        """Each device's (gpu, used bytes, total bytes) now, asked of NVML; [] without it."""
        return [] if self._session is None else self._session.memory(self.gpus)

    def close(self) -> None:
        """Shut NVML down (once; later calls do nothing)."""
        if self._session is not None:
            self._session.close()

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": dict(self.facts),
            "nvml": self.nvml,
            "gpus": [g.to_json() for g in self.gpus],
        }


class _Session:
    """NVML, initialised, with each device's handle."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml
        self.handles: dict[int, Any] = {}
        self.open = True

    def __repr__(self) -> str:
        return f"_Session({len(self.handles)} devices, {'open' if self.open else 'closed'})"

    def memory(self, gpus: Sequence[Gpu]) -> list[tuple[Gpu, int, int]]:
        out: list[tuple[Gpu, int, int]] = []
        if not self.open:
            return out
        for g in gpus:
            handle = self.handles.get(g.index)
            if handle is None:
                continue
            try:
                m = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except self.nvml.NVMLError as e:
                # One device failing (lost, reset) must not fail the scrape of the others.
                log.debug("GPU %d: no memory reading from NVML: %s", g.index, e)
                continue
            out.append((g, int(m.used), int(m.total)))
        return out

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as e:
            log.warning("NVML shutdown failed: %s", e)


def detect() -> HostFacts:
    """This host's facts, NVML left initialised when present. Blocking; never raises."""
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
        for index in range(count):
            gpu, handle = _device(nv, index)
            gpus.append(gpu)
            if handle is not None:
                session.handles[index] = handle
        driver = _ask(nv, "the driver version", lambda: str(nv.nvmlSystemGetDriverVersion()), "")
        cuda = _ask(nv, "the CUDA version", lambda: _cuda_version(nv), 0)
    except BaseException:
        session.close()
        raise
    facts = {**base, **gpu_facts(gpus, driver, cuda)}
    return HostFacts(dict(sorted(facts.items())), "ok", tuple(gpus), session)


def _device(nv: ModuleType, index: int) -> tuple[Gpu, Any]:
    """One device's record and handle (None when NVML gives none)."""
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
    except nv.NVMLError as e:
        log.warning("GPU %d: NVML gives no handle: %s", index, e)
        return Gpu(index, "", "", 0, UNKNOWN), None
    name = _ask(nv, f"GPU {index}'s name", lambda: str(nv.nvmlDeviceGetName(handle)), "")
    uuid = _ask(nv, f"GPU {index}'s UUID", lambda: str(nv.nvmlDeviceGetUUID(handle)), "")
    total = _ask(
        nv, f"GPU {index}'s memory", lambda: int(nv.nvmlDeviceGetMemoryInfo(handle).total), 0
    )
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(handle)
        mig = "on" if current == nv.NVML_DEVICE_MIG_ENABLE else "off"
    except nv.NVMLError_NotSupported:
        mig = "unsupported"  # a GPU without MIG: counts as off
    except nv.NVMLError as e:
        log.warning("GPU %d: NVML cannot tell its MIG mode: %s", index, e)
        mig = UNKNOWN
    return Gpu(index, name, uuid, total, mig), handle


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
