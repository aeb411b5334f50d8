"""Compat facts: what a host knows, what a publish keys on, which keys a restore tries."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence

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


@pytest.mark.usefixtures("x86")
def test_publish_facts() -> None:
    # The configured default, with this host's values.
    assert compat.publish_facts(None, DEFAULT, {}) == compat.host_facts(DEFAULT, {})
    # Plain weights: format alone, whatever else the client says.
    assert compat.publish_facts(["format"], DEFAULT, {"gpu_model": "H100"}) == {"format": "2"}
    # format is always added; the client's values count only for the named facts.
    assert compat.publish_facts(["gpu_model"], DEFAULT, {"gpu_model": "H100", "cuda": "12.4"}) == {
        "format": "2",
        "gpu_model": "H100",
    }
    assert compat.publish_facts(["image"], DEFAULT, {"image": "sha256:abc"}) == {
        "format": "2",
        "image": "sha256:abc",
    }


@pytest.mark.parametrize(
    ("configured", "given_", "expected"),
    [
        (
            DEFAULT,
            {},
            [("arch", "cuda", "driver_major", "format", "gpu_model"), ("format",)],
        ),
        (
            DEFAULT,
            {"image": "sha256:abc", "gpu_model": "H100"},
            [
                ("arch", "cuda", "driver_major", "format", "gpu_model", "image"),
                ("arch", "cuda", "driver_major", "format", "gpu_model"),
                ("format",),
            ],
        ),
        (("format",), {}, [("format",)]),
        (("arch",), {}, [("arch", "format"), ("format",)]),
        (("arch",), {"format": "1"}, [("arch", "format"), ("format",)]),
        ((), {"image": "x"}, [("format", "image"), ("format",)]),
    ],
)
def test_candidate_keys_most_specific_first_without_repeats(
    configured: Sequence[str], given_: Mapping[str, str], expected: list[tuple[str, ...]]
) -> None:
    assert compat.candidate_keys(configured, given_) == expected


def test_matches() -> None:
    host = {"arch": "x86_64", "format": "2", "gpu_model": "none"}
    assert compat.matches({}, host)
    assert compat.matches({"format": "1"}, host)
    assert compat.matches({"format": "1", "gpu_model": "none"}, host)  # none is a value too
    assert compat.matches(host, host)
    # Every format this host reads fits, not only the one it writes; a newer one does not.
    assert compat.matches({"format": "2"}, host)
    assert not compat.matches({"format": "3"}, host)
    assert not compat.matches({"format": "1", "gpu_model": "H100"}, host)
    assert not compat.matches({"format": "1", "cuda": "none"}, host)  # the host does not say


@pytest.mark.usefixtures("x86")
def test_a_restore_finds_the_snapshot_when_format_is_not_configured() -> None:
    # compat_facts = ["gpu_model"] is a valid config; publish adds format, so must restore.
    published = compat.publish_facts(None, ["gpu_model"], {})
    assert published == {"format": "2", "gpu_model": "none"}
    assert _tried(["gpu_model"], {})[0] == compat_digest(published)
    assert compat.matches(published, compat.host_facts(["gpu_model"], {}))


_fact = st.sampled_from(["gpu_model", "driver_major", "cuda", "arch", "format", "image"])
_client_fact = _fact.filter(lambda f: f != "format")  # clients say what hostd cannot tell
_value = st.sampled_from(["none", "H100", "1", "x86_64"])


def _tried(configured: Sequence[str], given_: Mapping[str, str]) -> list[str]:
    """The compat digests a restore looks up, in order (FORMAT.md section 7)."""
    host = compat.host_facts(configured, given_)
    return [compat_digest(f) for f in compat.lookup_digests(configured, given_, host)]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(_fact, unique=True),
    st.dictionaries(_client_fact, _value),
    st.lists(_fact, unique=True),
    st.dictionaries(_client_fact, _value),
)
def test_a_restore_tries_the_key_its_snapshot_was_published_under(
    configured: list[str],
    given_: dict[str, str],
    other_configured: list[str],
    other_given: dict[str, str],
) -> None:
    # The same host config and client facts: the snapshot is found by its exact key.
    published = compat.publish_facts(None, configured, given_)
    assert compat_digest(published) in _tried(configured, given_)
    # A snapshot keyed on format alone resolves on every host, however configured.
    plain = compat.publish_facts(["format"], configured, given_)
    assert _tried(other_configured, other_given)[-2] == compat_digest(plain)
    # So does one an older hostd published (format 1) under the same facts, after it.
    old = published | {"format": "1"}
    tried = _tried(configured, given_)
    assert tried.index(compat_digest(old)) == tried.index(compat_digest(published)) + 1
    assert _tried(other_configured, other_given)[-1] == compat_digest({"format": "1"})
