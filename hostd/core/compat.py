"""Compat keys: which facts a snapshot is valid under, and how a restore looks them up. Pure.

A publish names the facts its snapshot depends on (plain weights: `format` alone); a host
knows values for its facts, `none` where it cannot tell yet. A restore tries the compat keys
a snapshot is most likely published under, most specific first, then falls back to listing.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping, Sequence

from hostd.core.manifest import FORMAT_VERSION, READABLE_FORMATS

UNKNOWN = "none"


def host_facts(names: Iterable[str], given: Mapping[str, str]) -> dict[str, str]:
    """This host's value of each fact: the client's, else what hostd can tell, else none.

    `format` is always among them: every snapshot is published under it and every restore
    looks it up (candidate_keys), even when the configured facts leave it out.
    """
    known = {"format": str(FORMAT_VERSION), "arch": normalize_arch(platform.machine())}
    out = {n: known.get(n, UNKNOWN) for n in (*names, "format")}
    out.update(given)
    return dict(sorted(out.items()))


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m) or UNKNOWN


def publish_facts(
    facts: Sequence[str] | None, default: Sequence[str], given: Mapping[str, str]
) -> dict[str, str]:
    """The compat facts a snapshot is published under."""
    names = list(facts) if facts is not None else list(default)
    if "format" not in names:
        names.append("format")  # a snapshot is never valid across format versions
    return host_facts(names, {k: v for k, v in given.items() if k in names})


def candidate_keys(configured: Sequence[str], given: Mapping[str, str]) -> list[tuple[str, ...]]:
    """Fact-name sets to try in order: all the host knows, the configured set, format alone."""
    everything = tuple(sorted({*configured, *given, "format"}))
    configured_set = tuple(sorted({*configured, "format"}))
    out: list[tuple[str, ...]] = []
    for keys in (everything, configured_set, ("format",)):
        if keys not in out:
            out.append(keys)
    return out


def matches(snapshot_facts: Mapping[str, str], host: Mapping[str, str]) -> bool:
    """A snapshot fits a host when every fact it names has the host's value; `format` fits
    when this host reads that format, whichever one it writes."""
    return all(
        v in READABLE if k == "format" else host.get(k) == v for k, v in snapshot_facts.items()
    )


# The `format` values a restore looks a ref up under, newest first: a snapshot published by
# an older hostd keeps resolving on a newer one (FORMAT.md section 7).
READABLE = tuple(str(f) for f in sorted(READABLE_FORMATS, reverse=True))


def lookup_digests(
    configured: Sequence[str], given: Mapping[str, str], host: Mapping[str, str]
) -> list[dict[str, str]]:
    """The fact maps whose compat digests a restore tries, in order: each candidate name set
    (candidate_keys), under each format this host reads, newest first. A client that names
    a format itself gets that one only."""
    formats = (given["format"],) if "format" in given else READABLE
    out: list[dict[str, str]] = []
    for keys in candidate_keys(configured, given):
        for fmt in formats:
            facts = {k: host.get(k, UNKNOWN) for k in keys} | {"format": fmt}
            if facts not in out:
                out.append(facts)
    return out
