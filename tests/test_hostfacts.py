"""The host's own facts (hostd/hostfacts.py): their spelling, NVML absent for real, and NVML
present through pynvml's real ctypes code talking to a fake libnvidia-ml.so.1 (fakenvml.c).

No GPU can be had here, so the fake stands in for the driver's library alone: it exports the
C functions pynvml calls, with NVML's return codes and struct layouts. dlopen reads
LD_LIBRARY_PATH once, at process start, so every run against the fake is its own process: a
`python -c` that prints what detect() found, or a real daemon.

NVML can hang; the fake hangs on demand (a hold file: while it exists, the call waits), so the
bounds around it (detection's, the memory readings') are tested in real daemons, and their
logic in-process with a fake clock and readers that wait on events.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import logging
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import ROOT, Hostd, make_tree, nvml_env, request, rmtree, short_tmp, tree_digest
from test_e2e import promtool_check, sample, samples

from hostd.core.compat import normalize_arch
from hostd.core.manifest import FORMAT_VERSION
from hostd.hostfacts import (
    DETECT_TIMEOUT,
    NO_LIBRARY,
    Gpu,
    GpuMemory,
    HostFacts,
    cuda_fact,
    detect,
    detect_bounded,
    detect_timeout,
    gpu_facts,
    mig_fact,
)

T = TypeVar("T")

JSON = dict[str, Any]
MiB = 1024 * 1024
GPU_FACTS = ("gpu_model", "gpu_count", "gpu_memory", "mig", "driver", "driver_major", "cuda")
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
T4 = "Tesla T4"  # no MIG: NVML answers NOT_SUPPORTED


def real_facts() -> dict[str, str]:
    """The facts this host tells without a GPU, computed here independently."""
    return {
        "arch": normalize_arch(platform.machine()),
        "kernel": platform.release() or "none",
        "format": str(FORMAT_VERSION),
    }


# -- the spelling (a contract: these strings enter compat digests) -----------------------------


def gpu(index: int, name: str, mib: int, mig: str = "off") -> Gpu:
    return Gpu(index, name, f"GPU-{index}", mib * MiB, mig)


def test_one_model_eight_times() -> None:
    gpus = [gpu(i, H100, 81559) for i in range(8)]
    assert gpu_facts(gpus, "550.54.15", 12040) == {
        "gpu_model": H100,
        "gpu_count": "8",
        "gpu_memory": "81559",
        "mig": "off",
        "driver": "550.54.15",
        "driver_major": "550",
        "cuda": "12.4",
    }


def test_several_models_are_sorted_and_joined_and_memory_sorts_as_numbers() -> None:
    gpus = [gpu(0, H100, 81559), gpu(1, T4, 15360), gpu(2, A100, 81920), gpu(3, H100, 81559)]
    facts = gpu_facts(gpus, "535.104.05", 12020)
    assert facts["gpu_model"] == f"{A100}+{H100}+{T4}"
    assert facts["gpu_memory"] == "15360+81559+81920"  # not "15360" last, as text would sort
    assert gpu_facts([gpu(0, T4, 9000), gpu(1, T4, 15360)], "", 0)["gpu_memory"] == "9000+15360"
    assert (facts["gpu_count"], facts["driver_major"], facts["cuda"]) == ("4", "535", "12.2")


def test_memory_is_floored_to_whole_mib() -> None:
    odd = Gpu(0, H100, "", 81559 * MiB + MiB - 1, "off")
    assert gpu_facts([odd], "", 0)["gpu_memory"] == "81559"


def test_what_no_device_could_tell_is_none() -> None:
    facts = gpu_facts([gpu(0, H100, 81559), Gpu(1, "", "", 0, "none")], "", 0)
    assert facts == {
        "gpu_model": "none",
        "gpu_count": "2",  # NVML counted them
        "gpu_memory": "none",
        "mig": "none",
        "driver": "none",
        "driver_major": "none",
        "cuda": "none",
    }
    assert gpu_facts([], "550.54.15", 12040) == {
        "gpu_model": "none",
        "gpu_count": "0",
        "gpu_memory": "none",
        "mig": "none",
        "driver": "550.54.15",
        "driver_major": "550",
        "cuda": "12.4",
    }


def test_mig_on_off_mixed() -> None:
    assert mig_fact(["on", "on"]) == "on"
    assert mig_fact(["off", "off"]) == "off"
    assert mig_fact(["on", "off"]) == "mixed"
    assert mig_fact(["unsupported", "off"]) == "off"  # a GPU without MIG has it off
    assert mig_fact(["unsupported", "on"]) == "mixed"
    assert mig_fact(["on", "none"]) == "none"  # one device could not tell
    assert mig_fact([]) == "none"


def test_cuda_versions() -> None:
    assert [cuda_fact(v) for v in (12040, 11080, 10010, 12000, 0)] == [
        "12.4",
        "11.8",
        "10.1",
        "12.0",
        "none",
    ]


# -- NVML absent, for real ----------------------------------------------------------------------


def nvml_is_absent() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return True
    return False


absent_only = pytest.mark.skipif(not nvml_is_absent(), reason="this host has NVML")


@absent_only
def test_without_nvml_the_gpu_facts_are_none_and_say_why() -> None:
    host = detect()
    assert host.nvml == NO_LIBRARY
    assert host.facts == {**real_facts(), **dict.fromkeys(GPU_FACTS, "none")}
    assert all(isinstance(v, str) for v in host.facts.values())
    assert host.gpus == ()
    assert host.memory() == []
    host.close()
    host.close()


def test_importing_hostd_does_not_import_pynvml() -> None:
    code = (
        "import sys, hostd.daemon, hostd.cli, hostd.metrics, hostd.hostfacts; "
        "print('pynvml' in sys.modules)"
    )
    p = run([sys.executable, "-W", "error", "-c", code])
    assert (p.returncode, p.stdout, p.stderr) == (0, "False\n", "")


def test_without_pynvml_the_facts_say_so() -> None:
    # The import system refuses a module whose sys.modules entry is None, as if not installed.
    out = run_detect(None, prelude="import sys; sys.modules['pynvml'] = None")
    assert out["nvml"] == "pynvml not installed"
    assert out["facts"] == {**real_facts(), **dict.fromkeys(GPU_FACTS, "none")}


@absent_only
def test_a_daemon_without_nvml_reports_it_in_status_and_has_no_gpu_metrics(work: Path) -> None:
    with Hostd(work / "d") as d:
        status = cli_status_json(d)
        text = d.metrics()
        human = cli_status(d)
    facts = {**real_facts(), **dict.fromkeys(GPU_FACTS, "none")}
    assert status["host"] == {"facts": facts, "nvml": NO_LIBRARY, "gpus": []}
    assert "hostd_gpu_" not in text
    assert info_labels(text) == facts
    promtool_check(text)
    assert f"GPUs       none ({NO_LIBRARY})" in human.splitlines()
    assert f"host       {facts['arch']}, kernel {facts['kernel']}, format {FORMAT_VERSION}" in (
        human.splitlines()
    )


# -- NVML present for real: a GPU host -----------------------------------------------------------


def nvidia_smi(*args: str) -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("NVML is here but nvidia-smi is not: nothing to compare the facts with")
    p = subprocess.run([smi, *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.skipif(nvml_is_absent(), reason="needs a GPU host (libnvidia-ml.so.1)")
def test_a_gpu_host_reports_what_nvidia_smi_reports(work: Path) -> None:
    """The facts, status and gauges of a daemon on a real GPU host, against nvidia-smi (the
    driver's own tool, which reads NVML through its own code)."""
    rows = [
        [field.strip() for field in line.split(",")]
        for line in nvidia_smi(
            "--query-gpu=index,name,memory.total,driver_version,mig.mode.current",
            "--format=csv,noheader,nounits",
        ).splitlines()
        if line.strip()
    ]
    [cuda] = re.findall(r"CUDA Version: (\d+\.\d+)", nvidia_smi())
    names = {row[1] for row in rows}
    driver = rows[0][3]
    modes = {"Enabled": "on", "Disabled": "off"}
    with Hostd(work / "d") as d:
        status = cli_status_json(d)
        text = d.metrics()
        human = cli_status(d)
    facts = status["host"]["facts"]
    assert status["host"]["nvml"] == "ok"
    assert facts == {
        **real_facts(),
        "gpu_model": "+".join(sorted(names)),
        "gpu_count": str(len(rows)),
        "gpu_memory": "+".join(str(m) for m in sorted({int(row[2]) for row in rows})),
        "mig": mig_fact([modes.get(row[4], "none") for row in rows]),
        "driver": driver,
        "driver_major": driver.split(".")[0],
        "cuda": cuda,
    }
    assert info_labels(text) == facts
    assert gpus_in(text) == {row[0] for row in rows}
    for index, name, mib, *_ in rows:
        total = sample(text, "hostd_gpu_memory_total_bytes", gpu=index, model=name)
        used = sample(text, "hostd_gpu_memory_used_bytes", gpu=index, model=name)
        assert total // MiB == int(mib)
        assert 0 <= used <= total
    [line] = [line for line in human.splitlines() if line.startswith("GPUs ")]
    assert line.endswith(f"; driver {driver}, CUDA {cuda}"), line
    for name in names:
        assert f"{sum(row[1] == name for row in rows)} x {name}" in line, line


# -- NVML present: pynvml's real code against the fake library -----------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    """A short scratch directory under /tmp (socket paths must stay short), removed after."""
    root = short_tmp("hf")
    try:
        yield root
    finally:
        rmtree(root)


def run(argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


DETECT = """
import json
from hostd.hostfacts import detect
host = detect()
out = host.to_json()
out["memory"] = [[g.index, used, total] for g, used, total in host.memory()]
host.close()
host.close()  # idempotent: a second nvmlShutdown would fail, and log that it did
out["memory_after_close"] = host.memory()
try:
    import pynvml
    pynvml.nvmlDeviceGetCount()
    out["after_close"] = "initialised"
except ImportError:
    out["after_close"] = "no pynvml"
except pynvml.NVMLError as e:
    out["after_close"] = type(e).__name__
print(json.dumps(out))
"""


def run_detect(lib: Path | None, gpus: str = "", *, prelude: str = "", **extra: str) -> JSON:
    env = nvml_env(lib, gpus, **extra)
    p = run([sys.executable, "-W", "error", "-c", f"{prelude}\n{DETECT}"], env)
    assert p.returncode == 0, p.stderr
    assert "NVML shutdown failed" not in p.stderr  # warnings reach stderr, logging unset
    out: JSON = json.loads(p.stdout)
    return out


def test_eight_of_one_model(fake_nvml: Path) -> None:
    out = run_detect(fake_nvml, ";".join([f"{H100},81559,0,1024"] * 8), cuda="12040")
    assert out["nvml"] == "ok"
    assert out["facts"] == {
        **real_facts(),
        "gpu_model": H100,
        "gpu_count": "8",
        "gpu_memory": "81559",
        "mig": "off",
        "driver": "550.54.15",
        "driver_major": "550",
        "cuda": "12.4",
    }
    assert out["gpus"][7] == {
        "index": 7,
        "name": H100,
        "uuid": "GPU-fa4e0000-0000-4000-8000-000000000007",
        "memory_total": 81559 * MiB,
        "mig": "off",
    }
    assert out["memory"] == [[i, 1024 * MiB, 81559 * MiB] for i in range(8)]
    assert out["memory_after_close"] == []
    assert out["after_close"] == "NVMLError_Uninitialized"  # close() shut NVML down


def test_mixed_models_and_mig(fake_nvml: Path) -> None:
    out = run_detect(fake_nvml, f"{H100},81559,0;{A100},81920,1", driver="535.104.05", cuda="12020")
    f = out["facts"]
    assert f["gpu_model"] == f"{A100}+{H100}"
    assert (f["gpu_count"], f["gpu_memory"], f["mig"]) == ("2", "81559+81920", "mixed")
    assert (f["driver"], f["driver_major"], f["cuda"]) == ("535.104.05", "535", "12.2")
    assert [g["mig"] for g in out["gpus"]] == ["off", "on"]


def test_mig_on_everywhere(fake_nvml: Path) -> None:
    assert run_detect(fake_nvml, f"{A100},81920,1;{A100},81920,1")["facts"]["mig"] == "on"


def test_a_gpu_without_mig_counts_as_off(fake_nvml: Path) -> None:
    out = run_detect(fake_nvml, f"{T4},15360,x;{H100},81559,0")
    assert out["nvml"] == "ok"
    assert [g["mig"] for g in out["gpus"]] == ["unsupported", "off"]
    assert (out["facts"]["mig"], out["facts"]["gpu_memory"]) == ("off", "15360+81559")


def test_init_failure_is_reported(fake_nvml: Path) -> None:
    out = run_detect(fake_nvml, f"{H100},81559,0", init_error="9")  # DRIVER_NOT_LOADED
    assert out["nvml"] == "NVML init failed: Driver Not Loaded"
    assert out["facts"] == {**real_facts(), **dict.fromkeys(GPU_FACTS, "none")}
    assert (out["gpus"], out["memory"]) == ([], [])


def test_nvml_with_no_devices(fake_nvml: Path) -> None:
    out = run_detect(fake_nvml, "")
    assert out["nvml"] == "ok"
    assert out["facts"] == {
        **real_facts(),
        "gpu_model": "none",
        "gpu_count": "0",
        "gpu_memory": "none",
        "mig": "none",
        "driver": "550.54.15",
        "driver_major": "550",
        "cuda": "12.4",
    }
    assert (out["gpus"], out["memory"]) == ([], [])


def test_a_gpu_lost_at_start_leaves_its_facts_unknown(fake_nvml: Path, work: Path) -> None:
    (work / "lost").write_text("1")
    out = run_detect(fake_nvml, f"{H100},81559,0;{H100},81559,0", lost_file=str(work / "lost"))
    assert out["nvml"] == "ok"
    f = out["facts"]
    assert (f["gpu_count"], f["gpu_model"], f["gpu_memory"], f["mig"]) == ("2", *["none"] * 3)
    assert (f["driver"], f["cuda"]) == ("550.54.15", "12.4")
    assert out["gpus"][1] == {"index": 1, "name": "", "uuid": "", "memory_total": 0, "mig": "none"}
    assert out["memory"] == [[0, 0, 81559 * MiB]]


def test_an_old_driver_without_the_v2_cuda_call(fake_nvml: Path) -> None:
    out = run_detect(fake_nvml / "old", f"{H100},81559,0", cuda="10000")
    assert out["facts"]["cuda"] == "10.0"


def test_a_daemon_with_gpus_reports_them_and_survives_a_lost_one(
    fake_nvml: Path, work: Path
) -> None:
    lost = work / "lost"
    env = nvml_env(fake_nvml, f"{H100},81559,0,1024;{A100},81920,1,2048", lost_file=str(lost))
    with Hostd(work / "d", env=env) as d:
        status = cli_status_json(d)
        human = cli_status(d).splitlines()
        text = d.metrics()
        lost.write_text("1")  # GPU 1 falls off the bus: NVML_ERROR_GPU_IS_LOST from now on

        # A scrape answers from the last reading and starts the next: the loss shows within a
        # few scrapes.
        def without_gpu_1() -> str | None:
            text = d.metrics()
            return text if gpus_in(text) == {"0"} else None

        after = poll("GPU 1 left out of /metrics", without_gpu_1)
        assert d.api("GET", "/v1/status")[0] == 200
        d.signal(signal.SIGTERM)
        assert d.wait() == 0  # closing shuts NVML down cleanly
        log = d.log()
    host = status["host"]
    assert host["nvml"] == "ok"
    assert host["facts"] == {
        **real_facts(),
        "gpu_model": f"{A100}+{H100}",
        "gpu_count": "2",
        "gpu_memory": "81559+81920",
        "mig": "mixed",
        "driver": "550.54.15",
        "driver_major": "550",
        "cuda": "12.4",
    }
    assert [(g["index"], g["name"], g["memory_total"]) for g in host["gpus"]] == [
        (0, H100, 81559 * MiB),
        (1, A100, 81920 * MiB),
    ]
    assert (
        f"GPUs       1 x {H100} + 1 x {A100}, 81559+81920 MiB, MIG mixed; "
        "driver 550.54.15, CUDA 12.4"
    ) in human

    assert info_labels(text) == host["facts"]
    for i, model, total, used in ((0, H100, 81559, 1024), (1, A100, 81920, 2048)):
        labels = {"gpu": str(i), "model": model}
        assert sample(text, "hostd_gpu_memory_total_bytes", **labels) == total * MiB
        assert sample(text, "hostd_gpu_memory_used_bytes", **labels) == used * MiB
    promtool_check(text)

    assert gpus_in(after) == {"0"}  # the lost one is left out; the scrape still answers
    promtool_check(after)
    assert "GPU 1: no memory reading from NVML: GPU is lost" in log


# -- NVML that hangs: bounded detection, memory readings off the loop ----------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reader:
    """A GPU memory reader that answers `answers` (None: the device is lost), each device's
    answer waiting until its gate is set. `asked` gets each index as a reading starts."""

    def __init__(self, answers: dict[int, tuple[int, int] | None]) -> None:
        self.answers = answers
        self.gates = {i: threading.Event() for i in answers}
        self.asked: queue.Queue[int] = queue.Queue()

    def __call__(self, gpu: Gpu) -> tuple[int, int] | None:
        self.asked.put(gpu.index)
        assert self.gates[gpu.index].wait(30)
        return self.answers[gpu.index]

    def open(self, *indices: int) -> None:
        for i in indices or tuple(self.gates):
            self.gates[i].set()


def refreshers() -> int:
    return sum(t.name == "hostd-gpu-memory" for t in threading.enumerate())


G0, G1 = gpu(0, H100, 81559), gpu(1, A100, 81920)
AT_DETECTION = [(G0, 1 * MiB, G0.memory_total), (G1, 2 * MiB, G1.memory_total)]


def test_gpu_memory_answers_from_its_last_reading_and_refreshes_on_a_thread() -> None:
    clock, reader = Clock(), Reader({0: (5 * MiB, G0.memory_total), 1: (6 * MiB, G1.memory_total)})
    memory = GpuMemory([G0, G1], reader, AT_DETECTION, stale_after=10, clock=clock)
    assert memory.latest() == AT_DETECTION  # detection's reading is fresh: nothing asked
    assert (reader.asked.empty(), memory.idle.is_set()) == (True, True)

    clock.now += 1
    assert memory.latest() == AT_DETECTION  # answered at once; a refresh started
    assert reader.asked.get(timeout=30) == 0  # ... and is held in NVML
    clock.now += 5
    for _ in range(3):  # one refresh at a time, however many scrapes come meanwhile
        assert memory.latest() == AT_DETECTION
    assert (refreshers(), reader.asked.empty()) == (1, True)

    reader.open()
    assert memory.idle.wait(30)
    assert memory.latest() == [(G0, 5 * MiB, G0.memory_total), (G1, 6 * MiB, G1.memory_total)]
    assert memory.idle.wait(30)  # that scrape started the next refresh; the gates are open


def test_a_lost_gpu_is_left_out_at_once() -> None:
    clock, reader = Clock(), Reader({0: (5 * MiB, G0.memory_total), 1: None})
    reader.open()
    memory = GpuMemory([G0, G1], reader, AT_DETECTION, stale_after=10, clock=clock)
    clock.now += 1
    memory.latest()
    assert memory.idle.wait(30)
    assert memory.latest() == [(G0, 5 * MiB, G0.memory_total)]
    assert memory.idle.wait(30)


def test_a_reading_unanswered_past_the_bound_drops_that_gpu_until_nvml_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "hostd.hostfacts")
    clock, reader = Clock(), Reader({0: (5 * MiB, G0.memory_total), 1: (6 * MiB, G1.memory_total)})
    reader.open(0)  # GPU 1's reading hangs
    memory = GpuMemory([G0, G1], reader, AT_DETECTION, stale_after=10, clock=clock)
    clock.now += 1
    memory.latest()
    assert [reader.asked.get(timeout=30) for _ in range(2)] == [0, 1]  # GPU 0 read, GPU 1 held
    clock.now += 9.9
    assert memory.latest() == [(G0, 5 * MiB, G0.memory_total), AT_DETECTION[1]]
    assert "has not answered" not in caplog.text
    clock.now += 0.1
    assert memory.latest() == [(G0, 5 * MiB, G0.memory_total)]  # GPU 1 dropped, not frozen
    assert "NVML has not answered a GPU memory reading for 10.0 s" in caplog.text
    assert "GPUs [1]" in caplog.text
    assert memory.latest() == [(G0, 5 * MiB, G0.memory_total)]
    assert caplog.text.count("has not answered") == 1  # said once per stall

    reader.open(1)
    assert memory.idle.wait(30)
    # (said once the refresh is done, after `idle` is set for the next one)
    deadline = time.monotonic() + 30
    while "NVML answered the GPU memory reading again" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.01)
    assert memory.latest() == [(G0, 5 * MiB, G0.memory_total), (G1, 6 * MiB, G1.memory_total)]
    assert memory.idle.wait(30)


def test_without_nvml_gpu_memory_never_starts_a_thread() -> None:
    clock = Clock()
    memory = GpuMemory.of(HostFacts({"arch": "x86_64"}, "no NVML"), clock=clock)
    clock.now += 100
    assert (memory.latest(), memory.idle.is_set(), refreshers()) == ([], True, 0)


class Late(HostFacts):
    """Facts whose close() is seen (a detection's NVML shut down)."""

    closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def test_detection_past_its_bound_is_dropped_and_its_nvml_shut_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    late = Late({"arch": "x"}, "ok")

    def detector() -> HostFacts:
        assert release.wait(30)
        return late

    started = time.monotonic()
    host = detect_bounded(0.2, detector=detector)
    assert 0.2 <= time.monotonic() - started < 5
    assert host.nvml == "NVML did not answer within 0.2 s; GPU facts unknown until hostd restarts"
    assert host.facts == {**real_facts(), **dict.fromkeys(GPU_FACTS, "none")}
    assert (host.gpus, host.readings, host.timeout) == ((), (), 0.2)
    assert "NVML did not answer within 0.2 s" in caplog.text
    release.set()
    assert late.closed.wait(30)


def test_detection_within_its_bound_is_used() -> None:
    found = HostFacts({"arch": "x"}, "ok")
    host = detect_bounded(30, detector=lambda: found)
    assert (host, host.timeout) == (found, 30)


def test_the_nvml_timeout_comes_from_the_environment() -> None:
    assert detect_timeout({}) == DETECT_TIMEOUT == 10
    assert detect_timeout({"HOSTD_NVML_TIMEOUT": "1"}) == 1
    assert detect_timeout({"HOSTD_NVML_TIMEOUT": " 2.5 "}) == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf"):
        assert detect_timeout({"HOSTD_NVML_TIMEOUT": bad}) == DETECT_TIMEOUT, bad


def test_a_daemon_whose_nvml_init_hangs_starts_without_gpu_facts(
    fake_nvml: Path, work: Path
) -> None:
    hold = work / "init-hold"
    hold.touch()  # nvmlInit does not return while this exists
    env = {
        **nvml_env(fake_nvml, f"{H100},81559,0,1024", init_hold_file=str(hold)),
        "HOSTD_NVML_TIMEOUT": "1",
    }
    src = make_tree(work / "src")
    started = time.monotonic()
    with Hostd(work / "d", env=env) as d:
        took = time.monotonic() - started
        assert Path(f"{hold}.held").exists()  # detection did reach nvmlInit, and is held there
        assert 1 <= took < 1 + 8, took  # the bound, plus starting Python and the cache
        host = cli_status_json(d)["host"]
        why = "NVML did not answer within 1 s; GPU facts unknown until hostd restarts"
        assert host == {
            "facts": {**real_facts(), **dict.fromkeys(GPU_FACTS, "none")},
            "nvml": why,
            "gpus": [],
        }
        assert f"GPUs       none ({why})" in cli_status(d).splitlines()
        assert "hostd_gpu_" not in d.metrics()
        d.publish(src, "hf/tree")  # restores that need no GPU fact work
        assert d.restore("hf/tree", work / "out")["event"] == "result"
        assert tree_digest(work / "out") == tree_digest(src)

        hold.unlink()  # NVML answers at last: too late, what it found is dropped
        poll("the late detection dropped", lambda: "past the 1 s bound: dropping" in d.log())
        assert cli_status_json(d)["host"]["nvml"] == why
        assert "hostd_gpu_" not in d.metrics()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert "Traceback" not in d.log()


def test_a_hung_memory_reading_slows_neither_status_nor_metrics(
    fake_nvml: Path, work: Path
) -> None:
    hold = work / "meminfo-hold"
    gpus = f"{H100},81559,0,1024;{A100},81920,1,2048"
    env = {
        **nvml_env(fake_nvml, gpus, meminfo_hold_file=str(hold)),
        "HOSTD_NVML_TIMEOUT": "120",  # long: the cached values stay shown throughout
    }
    want = {("0", H100): (1024 * MiB, 81559 * MiB), ("1", A100): (2048 * MiB, 81920 * MiB)}
    with Hostd(work / "d", env=env) as d:
        assert memory_in(d.metrics()) == want  # detection's reading
        hold.touch()  # from now on nvmlDeviceGetMemoryInfo does not return
        held = Path(f"{hold}.held")
        # Scrape until one has started a refresh (due 1 s after the last) and it is held.
        poll("a memory reading held in NVML", lambda: d.metrics() and held.exists())

        stop = threading.Event()

        def scrape() -> list[tuple[float, str]]:
            out = []
            while not stop.is_set():
                out.append(timed(d.metrics))
            return out

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            scrapes = [pool.submit(scrape) for _ in range(2)]
            try:
                statuses = [
                    timed(lambda: request(d.socket, "GET", "/v1/status")) for _ in range(30)
                ]
            finally:
                stop.set()
            scraped = [s for f in scrapes for s in f.result(timeout=60)]
        # (a status or scrape that waited for the held reading would take its 120 s; the
        # bound leaves room for a loaded machine's scheduling)
        assert all(status == 200 for _, (status, _) in statuses)
        assert max(t for t, _ in statuses) < 5, sorted(t for t, _ in statuses)[-3:]
        assert scraped
        assert max(t for t, _ in scraped) < 5, sorted(t for t, _ in scraped)[-3:]
        assert all(memory_in(text) == want for _, text in scraped)  # the cached values

        # Stopping while NVML still holds the reading: close() gives up on it after a bound.
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert "NVML has not answered a call for over 2 s: not shutting it down" in d.log()


def test_gauges_of_a_gpu_nvml_leaves_unanswered_go_and_come_back(
    fake_nvml: Path, work: Path
) -> None:
    hold = work / "meminfo-hold"
    env = {
        **nvml_env(fake_nvml, f"{H100},81559,0,1024", meminfo_hold_file=str(hold)),
        "HOSTD_NVML_TIMEOUT": "1",
    }
    with Hostd(work / "d", env=env) as d:
        assert memory_in(d.metrics()) == {("0", H100): (1024 * MiB, 81559 * MiB)}
        hold.touch()
        poll("GPU 0's gauges dropped", lambda: "hostd_gpu_" not in d.metrics())
        assert "NVML has not answered a GPU memory reading for" in d.log()
        hold.unlink()
        poll("GPU 0's gauges back", lambda: memory_in(d.metrics()) != {})
        assert memory_in(d.metrics()) == {("0", H100): (1024 * MiB, 81559 * MiB)}
        assert "NVML answered the GPU memory reading again" in d.log()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert "not shutting it down" not in d.log()


# -- helpers ---------------------------------------------------------------------------------------


def cli(d: Hostd, *argv: str) -> str:
    p = run([sys.executable, "-m", "hostd", *argv, "--socket", str(d.socket)])
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    return p.stdout


def cli_status_json(d: Hostd) -> JSON:
    out: JSON = json.loads(cli(d, "status", "--json"))
    return out


def cli_status(d: Hostd) -> str:
    return cli(d, "status")


def info_labels(text: str) -> dict[str, str]:
    [labels] = [dict(ls) for (n, ls), v in samples(text).items() if n == "hostd_host_info"]
    assert sample(text, "hostd_host_info", **labels) == 1
    return labels


def gpus_in(text: str) -> set[str]:
    return {dict(ls)["gpu"] for n, ls in samples(text) if n.startswith("hostd_gpu_")}


def memory_in(text: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(gpu, model) -> (used, total) bytes, as a scrape shows them."""
    out = {}
    for name, ls in samples(text):
        if name == "hostd_gpu_memory_used_bytes":
            labels = dict(ls)
            out[(labels["gpu"], labels["model"])] = (
                sample(text, "hostd_gpu_memory_used_bytes", **labels),
                sample(text, "hostd_gpu_memory_total_bytes", **labels),
            )
    return out


def timed(call: Callable[[], T]) -> tuple[float, T]:
    started = time.monotonic()
    out = call()
    return time.monotonic() - started, out


def poll(what: str, check: Callable[[], T | None], timeout: float = 30.0) -> T:
    """`check()` once it is true, asked every 50 ms until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)
    return got
