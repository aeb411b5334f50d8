"""Compat keys: which facts a snapshot is valid under, and how a restore looks them up. Pure.

A publish keys its snapshot on the facts of its *kind* (plain weights, `files`: `format`
alone; `compile-cache`: the GPU, driver and CUDA; `process`: the exact driver and kernel too),
plus the facts its client adds. A host knows values for its facts, `none` where it cannot
tell. A restore tries the compat keys a snapshot is most likely published under, most
specific first, then falls back to listing; a miss explains itself (`differences`).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping, Sequence

from hostd.core.manifest import FORMAT_VERSION, READABLE_FORMATS

UNKNOWN = "none"

KINDS = ("files", "compile-cache", "process")
DEFAULT_KIND = "files"
# The facts that describe the GPU side of a host. A snapshot whose GPU facts are all `none`
# made no GPU claim (every publish before hosts knew them): it fits any GPU.
GPU_FACTS = frozenset(
    {"gpu_model", "gpu_count", "gpu_memory", "mig", "driver", "driver_major", "cuda"}
)
# What a hostd before this one could tell itself; of the facts this one detects, the rest
# (the GPU facts and the kernel) were `none` unless the client gave them. Published as
# `none`, such a fact is no claim: the publisher could not tell.
OLD_KNOWN = frozenset({"format", "arch"})
DETECTED = GPU_FACTS | {"kernel"}
COMPILE_CACHE_FACTS = ("gpu_model", "driver_major", "cuda", "arch", "format")
PROCESS_EXTRA_FACTS = ("driver", "kernel")

Kinds = Mapping[str, Sequence[str]]


def default_kinds(compile_cache: Sequence[str] = COMPILE_CACHE_FACTS) -> dict[str, tuple[str, ...]]:
    """Each kind's fact names: `process` is `compile-cache` plus the exact driver and kernel."""
    cc = with_format(compile_cache)
    return {
        "files": ("format",),
        "compile-cache": cc,
        "process": with_format(
            [*(f for f in cc if f != "format"), *(f for f in PROCESS_EXTRA_FACTS if f not in cc)]
        ),
    }


def with_format(names: Iterable[str]) -> tuple[str, ...]:
    out = tuple(names)
    return out if "format" in out else (*out, "format")


def basic_facts() -> dict[str, str]:
    """What hostd tells without asking the GPU: its format, the CPU arch and the kernel."""
    return {
        "format": str(FORMAT_VERSION),
        "arch": normalize_arch(platform.machine()),
        "kernel": platform.release() or UNKNOWN,
    }


def host_facts(
    names: Iterable[str], given: Mapping[str, str], known: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This host's value of each fact: the client's, else what the host can tell (`known`,
    by default `basic_facts`), else none.

    `format` is always among them: every snapshot is published under it and every restore
    looks it up (candidate_keys), even when the configured facts leave it out.
    """
    known = basic_facts() if known is None else known
    out = {n: known.get(n, UNKNOWN) for n in (*names, "format")}
    out.update(given)
    return dict(sorted(out.items()))


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m) or UNKNOWN


def publish_facts(
    names: Sequence[str], given: Mapping[str, str], known: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The compat facts a snapshot is published under: the named ones (a kind's, or the
    client's own pick) with this host's values, `format` always, and every fact the client
    gives, added or overriding."""
    return host_facts(names, given, known)


def gpu_claim(facts: Mapping[str, str]) -> bool:
    """Whether a fact set says anything about the GPU (a value other than none)."""
    return any(v != UNKNOWN for k, v in facts.items() if k in GPU_FACTS)


def candidate_keys(kinds: Kinds, given: Mapping[str, str]) -> list[tuple[str, ...]]:
    """Fact-name sets to try in order: each kind's with the client's facts, most specific
    kind first, then each kind's alone."""
    order = [kinds[k] for k in reversed(KINDS) if k in kinds]
    out: list[tuple[str, ...]] = []
    for extra in (tuple(given), ()):
        for names in order:
            keys = tuple(sorted({*names, *extra, "format"}))
            if keys not in out:
                out.append(keys)
    return out


def differences(snapshot_facts: Mapping[str, str], host: Mapping[str, str]) -> list[str]:
    """The facts a snapshot names that this host does not fit, by name. `format` fits when
    this host reads that format, whichever one it writes; a fact hostd detects (DETECTED)
    published as `none` is no claim (its publisher could not tell) and fits every host."""
    return [
        k
        for k, v in sorted(snapshot_facts.items())
        if (
            v not in READABLE
            if k == "format"
            else not (v == UNKNOWN and k in DETECTED) and host.get(k, UNKNOWN) != v
        )
    ]


def matches(snapshot_facts: Mapping[str, str], host: Mapping[str, str]) -> bool:
    """A snapshot fits a host when every fact it names has the host's value (differences)."""
    return not differences(snapshot_facts, host)


# The `format` values a restore looks a ref up under, newest first: a snapshot published by
# an older hostd keeps resolving on a newer one (FORMAT.md section 7).
READABLE = tuple(str(f) for f in sorted(READABLE_FORMATS, reverse=True))


def lookup_digests(
    kinds: Kinds, given: Mapping[str, str], host: Mapping[str, str]
) -> list[dict[str, str]]:
    """The fact maps whose compat digests a restore tries, in order: each candidate name set
    (candidate_keys), under each format this host reads, newest first. A client that names
    a format itself gets that one only. Then the keys of snapshots published without what
    this host knows: the same sets with every GPU fact `none` (a publish on a host without
    a GPU), and as a hostd before this one keyed them (OLD_KNOWN and the client's facts,
    the rest `none`). Those fit this host (`differences`), after its own."""
    formats = (given["format"],) if "format" in given else READABLE
    keys = candidate_keys(kinds, given)
    out: list[dict[str, str]] = []
    for spelled in ("own", "no_gpu", "old"):
        for names in keys:
            for fmt in formats:
                facts = {k: host.get(k, UNKNOWN) for k in names} | {"format": fmt}
                if spelled == "no_gpu":
                    facts |= {k: UNKNOWN for k in names if k in GPU_FACTS}
                elif spelled == "old":
                    facts |= {k: UNKNOWN for k in names if k in DETECTED and k not in given}
                if facts not in out:
                    out.append(facts)
    return out


def kind_of(facts: Mapping[str, str], kinds: Kinds) -> str | None:
    """The most specific kind whose fact names a fact set holds all of (the rest are facts a
    client added), if any."""
    names = set(facts)
    fitting = [k for k in KINDS if k in kinds and set(kinds[k]) | {"format"} <= names]
    return max(fitting, key=lambda k: len(kinds[k]), default=None)
