"""Compat facts: what a host knows, what a publish keys on, which keys a restore tries."""

from __future__ import annotations

import platform
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core import compat
from hostd.core.ids import compat_digest

DEFAULT = ("gpu_model", "driver_major", "cuda", "arch", "format")


@pytest.fixture
def x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")


@pytest.mark.usefixtures("x86")
def test_host_facts_unknown_are_none_format_and_arch_known() -> None:
    assert compat.host_facts(DEFAULT, {}) == {
        "arch": "x86_64",
        "cuda": "none",
        "driver_major": "none",
        "format": "2",
        "gpu_model": "none",
    }
    assert compat.host_facts(["format"], {}) == {"format": "2"}
    # format is a fact of every host, named or not: every snapshot is published under it.
    assert compat.host_facts([], {}) == {"format": "2"}
    assert compat.host_facts(["gpu_model"], {}) == {"format": "2", "gpu_model": "none"}


@pytest.mark.usefixtures("x86")
def test_client_values_override_and_are_kept() -> None:
    given_ = {"gpu_model": "H100", "arch": "riscv64", "image": "sha256:abc"}
    facts = compat.host_facts(DEFAULT, given_)
    assert facts == {
        "arch": "riscv64",
        "cuda": "none",
        "driver_major": "none",
        "format": "2",
        "gpu_model": "H100",
        "image": "sha256:abc",  # a fact only the client knows is part of the host's facts
    }
    assert list(facts) == sorted(facts)


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("amd64", "x86_64"),
        ("arm64", "aarch64"),
        ("aarch64", "aarch64"),
        ("ppc64le", "ppc64le"),
        ("", "none"),
    ],
)
def test_arch_is_normalized(monkeypatch: pytest.MonkeyPatch, machine: str, arch: str) -> None:
    assert compat.normalize_arch(machine) == arch
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert compat.host_facts(["arch"], {}) == {"arch": arch, "format": "2"}


GPU_HOST = {
    "arch": "x86_64",
    "cuda": "12.4",
    "driver": "550.54.15",
    "driver_major": "550",
    "format": "2",
    "gpu_model": "NVIDIA H100 80GB HBM3",
    "kernel": "6.1.0",
}
KINDS = compat.default_kinds()


def test_kinds_default_facts() -> None:
    assert KINDS == {
        "files": ("format",),
        "compile-cache": ("gpu_model", "driver_major", "cuda", "arch", "format"),
        "process": ("gpu_model", "driver_major", "cuda", "arch", "driver", "kernel", "format"),
    }
    # compat_facts (the compile-cache list) also decides what `process` adds to
    assert compat.default_kinds(["gpu_model"]) == {
        "files": ("format",),
        "compile-cache": ("gpu_model", "format"),
        "process": ("gpu_model", "driver", "kernel", "format"),
    }


def test_publish_facts_take_the_hosts_values_and_add_the_clients() -> None:
    cc = compat.publish_facts(KINDS["compile-cache"], {"torch": "2.5.1"}, GPU_HOST)
    assert cc == {
        "arch": "x86_64",
        "cuda": "12.4",
        "driver_major": "550",
        "format": "2",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "torch": "2.5.1",
    }
    # Plain weights: format alone; a client fact is added, not dropped.
    assert compat.publish_facts(KINDS["files"], {}, GPU_HOST) == {"format": "2"}
    assert compat.publish_facts(KINDS["files"], {"image": "sha256:abc"}, GPU_HOST) == {
        "format": "2",
        "image": "sha256:abc",
    }
    # A client value overrides the host's; a fact nobody can tell is none.
    assert compat.publish_facts(["gpu_model", "mig"], {"gpu_model": "H200"}, GPU_HOST) == {
        "format": "2",
        "gpu_model": "H200",
        "mig": "none",
    }
    process = compat.publish_facts(KINDS["process"], {}, GPU_HOST)
    assert process["driver"] == "550.54.15"
    assert process["kernel"] == "6.1.0"


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        (
            {},
            [
                ("arch", "cuda", "driver", "driver_major", "format", "gpu_model", "kernel"),
                ("arch", "cuda", "driver_major", "format", "gpu_model"),
                ("format",),
            ],
        ),
        (
            {"torch": "2.5.1"},
            [
                (
                    "arch",
                    "cuda",
                    "driver",
                    "driver_major",
                    "format",
                    "gpu_model",
                    "kernel",
                    "torch",
                ),
                ("arch", "cuda", "driver_major", "format", "gpu_model", "torch"),
                ("format", "torch"),
                ("arch", "cuda", "driver", "driver_major", "format", "gpu_model", "kernel"),
                ("arch", "cuda", "driver_major", "format", "gpu_model"),
                ("format",),
            ],
        ),
    ],
)
def test_candidate_keys_most_specific_first_without_repeats(
    given_: Mapping[str, str], expected: list[tuple[str, ...]]
) -> None:
    assert compat.candidate_keys(KINDS, given_) == expected
    # one kind configured alone, or two kinds with the same facts, tried once
    same = {"files": ("format",), "compile-cache": ("format",)}
    assert compat.candidate_keys(same, {}) == [("format",)]


def test_matches_and_differences() -> None:
    host = {
        "arch": "x86_64",
        "format": "2",
        "gpu_model": "H100",
        "cuda": "12.4",
        "driver_major": "550",
    }
    assert compat.matches({}, host)
    assert compat.matches({"format": "1"}, host)
    assert compat.matches(host, host)
    # Every format this host reads fits, not only the one it writes; a newer one does not.
    assert compat.differences({"format": "3"}, host) == ["format"]
    assert compat.differences({"format": "2", "gpu_model": "A100", "cuda": "12.4"}, host) == [
        "gpu_model"
    ]
    # A fact the host cannot tell (none) differs from a published value.
    assert compat.differences({"format": "2", "torch": "2.5.1"}, host) == ["torch"]
    # GPU facts all none: no GPU claim, so they fit any GPU; other facts still count.
    legacy = {"arch": "x86_64", "cuda": "none", "driver_major": "none", "gpu_model": "none"}
    assert compat.matches(legacy | {"format": "2"}, host)
    assert compat.differences(legacy | {"format": "2", "arch": "aarch64"}, host) == ["arch"]
    # Each detected fact published as none is no claim, even beside a real one (an older
    # hostd's publish with only --compat gpu_model=...); a real value is compared.
    claim = legacy | {"format": "2", "gpu_model": "H100"}
    assert compat.differences(claim, host) == []
    assert compat.differences(claim | {"gpu_model": "A100"}, host) == ["gpu_model"]
    assert compat.differences({"format": "2", "kernel": "none"}, host) == []
    # A fact hostd does not detect is a plain value: none is compared like any other.
    assert compat.differences({"format": "2", "torch": "none"}, host) == []
    assert compat.differences({"format": "2", "torch": "none"}, host | {"torch": "2.5"}) == [
        "torch"
    ]


def test_kind_of() -> None:
    host = GPU_HOST | {"torch": "2.5.1"}
    for kind, names in KINDS.items():
        assert compat.kind_of(compat.publish_facts(names, {}, host), KINDS) == kind
        facts = compat.publish_facts(names, {"torch": "2.5.1"}, host)
        assert compat.kind_of(facts, KINDS) == kind  # client facts aside
    assert compat.kind_of({"gpu_model": "x"}, KINDS) is None  # no format: no kind's set


def test_a_snapshot_without_a_gpu_claim_resolves_on_a_gpu_host() -> None:
    """Published before hosts knew their GPU (compile-cache kind, GPU facts none): a GPU
    host looks it up by its key directly (an http origin cannot list), after its own."""
    old = compat.publish_facts(KINDS["compile-cache"], {}, compat.basic_facts())
    assert old["gpu_model"] == "none"
    assert not compat.gpu_claim(old)
    host = compat.host_facts(KINDS["process"], {}, GPU_HOST | {"arch": old["arch"]})
    tried = [compat_digest(f) for f in compat.lookup_digests(KINDS, {}, host)]
    assert compat_digest(old) in tried
    own = compat.publish_facts(KINDS["compile-cache"], {}, host)
    assert tried.index(compat_digest(own)) < tried.index(compat_digest(old))
    assert compat.matches(old, host)


_fact = st.sampled_from(["gpu_model", "driver_major", "cuda", "arch", "format", "image"])
_client_fact = _fact.filter(lambda f: f != "format")  # clients say what hostd cannot tell
_value = st.sampled_from(["none", "H100", "1", "x86_64"])
_kind = st.sampled_from(compat.KINDS)


def _tried(kinds: compat.Kinds, given_: Mapping[str, str], known: Mapping[str, str]) -> list[str]:
    """The compat digests a restore looks up, in order (FORMAT.md section 7)."""
    names = sorted({n for ns in kinds.values() for n in ns} | set(known))
    host = compat.host_facts(names, given_, known)
    return [compat_digest(f) for f in compat.lookup_digests(kinds, given_, host)]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(_fact, unique=True),
    _kind,
    st.dictionaries(_client_fact, _value),
    st.dictionaries(_fact, _value),
    st.lists(_fact, unique=True),
    st.dictionaries(_client_fact, _value),
)
def test_a_restore_tries_the_key_its_snapshot_was_published_under(
    compile_cache: list[str],
    kind: str,
    given_: dict[str, str],
    known: dict[str, str],
    other_cc: list[str],
    other_given: dict[str, str],
) -> None:
    kinds = compat.default_kinds(compile_cache)
    other = compat.default_kinds(other_cc)
    known = known | {"format": "2"}  # the format this hostd writes
    # The same host config and client facts: the snapshot is found by its exact key.
    published = compat.publish_facts(kinds[kind], given_, known)
    tried = _tried(kinds, given_, known)
    assert compat_digest(published) in tried
    assert compat.matches(published, compat.host_facts(published, given_, known))
    # A snapshot keyed on format alone resolves on every host, however configured.
    plain = compat.publish_facts(["format"], {}, known)
    assert compat_digest(plain) in _tried(other, other_given, known)
    # So does one an older hostd published (format 1) under the same facts, right after it.
    old = published | {"format": "1"}
    assert tried.index(compat_digest(old)) == tried.index(compat_digest(published)) + 1
    assert compat_digest({"format": "1"}) in _tried(other, other_given, known)


def test_a_gpu_host_finds_what_an_older_hostd_published_by_its_key() -> None:
    """An older hostd knew only format and arch; a client gave it gpu_model, so its key was
    gpu_model=H100 with cuda and driver_major none. The same client on a GPU host that
    knows all three still finds it by that key (an HTTP origin cannot list)."""
    given_ = {"gpu_model": "NVIDIA H100 80GB HBM3"}
    old = {"arch": "x86_64", "cuda": "none", "driver_major": "none", "format": "2"} | given_
    host = compat.host_facts(KINDS["process"], given_, GPU_HOST)
    tried = [compat_digest(f) for f in compat.lookup_digests(KINDS, given_, host)]
    assert compat_digest(old) in tried
    assert compat.matches(old, host)
