"""Human output of the snapshot and ref commands: rm, prune, refs, inspect, ref history/set.

Each function prints one command's result (the JSON the daemon answered) on a Printer;
`--json` prints that JSON instead and never comes here. Light imports only (output.py): a
client command pays for what it imports. Must not talk to the daemon.
"""

from __future__ import annotations

from hostd import output
from hostd.output import count, size, size_exact

# Types for the checker alone (a client command pays for what it imports).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from hostd.output import Printer

    JSON = dict[str, Any]
SHORT_ID = 12  # hex digits of an id in a table; --json has them whole


def short(value: object) -> str:
    return str(value)[:SHORT_ID] if isinstance(value, str) and value else "-"


def _facts(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(value.items()))


def _rows(out: Printer, title: str, rows: Sequence[JSON], *, why: bool) -> None:
    if not rows:
        return
    headers = ["SNAPSHOT", "REFS", "SIZE", "LAST USED"] + (["WHY"] if why else [])
    out.line(title)
    out.table(
        headers,
        [
            [
                short(r.get("snapshot")),
                ", ".join(str(x) for x in r.get("refs") or []) or "-",
                size(r.get("bytes")),
                output.when(r.get("last_used")),
            ]
            + ([str(r.get("why") or "")] if why else [])
            for r in rows
        ],
    )


def render_rm(out: Printer, result: JSON) -> None:
    removed: list[JSON] = result.get("removed") or []
    in_use: list[JSON] = result.get("in_use") or []
    _rows(out, "removed:", removed, why=False)
    _rows(out, "left (in use by a running restore):", in_use, why=False)
    out.pairs(
        [
            ("forgotten snapshots", count(len(removed))),
            ("removed blobs", count(result.get("removed_blobs"))),
            ("freed", size_exact(result.get("freed_bytes"))),
        ]
    )


def render_prune(out: Printer, result: JSON) -> None:
    dry = bool(result.get("dry_run"))
    removed: list[JSON] = result.get("removed") or []
    _rows(out, "would remove:" if dry else "removed:", removed, why=True)
    _rows(out, "left (in use by a running restore):", result.get("in_use") or [], why=True)
    _rows(out, "kept:", result.get("kept") or [], why=True)
    if dry:
        out.pairs(
            [
                ("would forget", count(len(removed))),
                ("would free", size_exact(result.get("freed_bytes"))),
                ("dry run", "nothing was changed"),
            ]
        )
    else:
        out.pairs(
            [
                ("forgotten snapshots", count(len(removed))),
                ("removed blobs", count(result.get("removed_blobs"))),
                ("freed", size_exact(result.get("freed_bytes"))),
            ]
        )


def render_refs(out: Printer, result: JSON) -> None:
    refs: list[JSON] = result.get("refs") or []
    if not refs:
        out.line(f"no refs at {result.get('origin')}")
        return
    out.table(
        ("REF", "COMPAT KEY", "FACTS", "SNAPSHOT", "FILES", "SIZE", "UPDATED"),
        [
            (
                str(r.get("ref")),
                short(r.get("compat_digest")),
                _facts(r.get("compat")) if "error" not in r else f"error: {r['error']}",
                short(r.get("snapshot")),
                count(r.get("files")),
                size(r.get("bytes")),
                output.when(r.get("updated")),
            )
            for r in refs
        ],
    )
    if result.get("truncated"):
        out.line(f"(only the first {len(refs):,}: give a PREFIX to see the rest)")


def render_inspect(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("format", result.get("format")),
            ("files", count(result.get("files"))),
            ("bytes", size_exact(result.get("bytes"))),
            ("chunk size", size(result.get("chunk_size"))),
            ("chunks", count(result.get("chunks"))),
            ("packs", count(result.get("packs"))),
            ("symlinks", count(result.get("symlinks"))),
            ("empty dirs", count(result.get("dirs"))),
            ("compat", _facts(result.get("compat"))),
            ("meta", _facts(result.get("meta"))),
            ("created", output.when(result.get("created"))),
            ("cached here", "yes, pinned" if result.get("pinned") else _yes(result.get("cached"))),
        ]
    )
    files: list[JSON] = result.get("file_list") or []
    links: list[JSON] = result.get("symlink_list") or []
    if files or links:
        out.line("")
        out.table(
            ("MODE", "SIZE", "PATH"),
            [(f"{f.get('mode', 0):04o}", count(f.get("size")), str(f.get("path"))) for f in files]
            + [("link", "-", f"{s.get('path')} -> {s.get('target')}") for s in links],
        )
    left = result.get("files_left_out")
    if left:
        out.line(f"({count(left)} more files not listed)")


def _yes(value: object) -> str:
    return "yes" if value else "no"


def render_history(out: Printer, result: JSON) -> None:
    keys: list[JSON] = result.get("keys") or []
    for i, key in enumerate(keys):
        if i:
            out.line("")
        out.line(
            f"{result.get('ref')} under compat key {short(key.get('compat_digest'))} "
            f"({_facts(key.get('compat'))}): now {short(key.get('snapshot'))}"
        )
        entries: list[JSON] = key.get("entries") or []
        out.table(
            ("SEQ", "SNAPSHOT", "SET", ""),
            [
                (
                    count(e.get("seq")),
                    short(e.get("snapshot")),
                    output.when(e.get("at")),
                    "error: " + str(e["error"])
                    if "error" in e
                    else ("current" if e.get("current") else str(e.get("note") or "")),
                )
                for e in entries
            ],
        )
        if key.get("older"):
            out.line(f"({count(key.get('older'))} older entries: --limit shows more)")


def render_ref_set(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("ref", result.get("ref")),
            ("snapshot", result.get("snapshot")),
            ("previous", result.get("previous") or "-"),
            ("seq", count(result.get("seq"))),
            ("compat", _facts(result.get("compat"))),
        ]
    )
