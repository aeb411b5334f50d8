"""The `hostd` command: `serve` runs the daemon, every other command talks to its socket.

Output contract, which scripts rely on:
- exit 0 ok, 1 failed, 2 usage, 3 not found (no such ref, or no snapshot for this host's
  compat key: boot from scratch and publish), 4 daemon unreachable, 130 interrupted;
- a failure is exactly one line on stderr, `hostd: <message>`;
- `--json` prints the final result as one JSON object on stdout and nothing else there;
- progress bars go to stderr, and only when stderr is a terminal.

This module parses, prints and maps errors to exit codes; what a command means is the
daemon's business, how to talk to it is client.py's, and how output looks is output.py's.
A client command imports small modules only: the daemon module only for `serve`, never
asyncio or aiohttp, and rich only to draw on a terminal (tests/test_cli.py checks it). So
the client commands start in tens of milliseconds and work without the daemon's
dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from hostd import output
from hostd.client import JSON, Client, ProgressCallback, resolve_socket
from hostd.errors import Busy, Forbidden, HostdError, UsageError
from hostd.output import Printer, count, duration, is_number, size, size_exact, sources, timings

EXIT_INTERRUPTED = 130

Call = Callable[[Client, ProgressCallback | None], JSON]
Render = Callable[[Printer, JSON], None]


def main(argv: list[str] | None = None) -> int:
    """Run one `hostd` command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (already reported) or --help
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except HostdError as exc:
        _fail(_explain(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        # The client closed its connection on the way out: the daemon sees the client go and
        # cancels the work.
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read stdout has gone (`hostd ls | head -1`). Point stdout at /dev/null so
        # the interpreter's last flush does not fail again on the way out.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# -- arguments ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, like every other failure."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("hostd").strip()
        _fail(f"{where + ': ' if where else ''}{message} (see '{self.prog} --help')")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hostd",
        description="Snapshot daemon for GPU hosts, and the client that talks to it.",
    )
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    client = _Parser(add_help=False)
    client.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's socket (default: $HOSTD_SOCKET, else the per-user or system one)",
    )
    client.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout"
    )
    compat = _Parser(add_help=False)
    compat.add_argument(
        "--compat",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="a compat fact the client supplies (repeatable), e.g. image=sha256:...",
    )

    def add(name: str, summary: str, *parents: _Parser) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=summary, parents=list(parents)
        )
        return sub

    serve = add("serve", "run the daemon")
    serve.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML config (default: $HOSTD_CONFIG)"
    )
    serve.set_defaults(command=_serve)

    restore = add("restore", "restore a snapshot into a directory", client, compat)
    restore.add_argument("ref", metavar="REF")
    restore.add_argument("target", metavar="TARGET", help="directory to create")
    restore.add_argument(
        "--mode",
        choices=("link", "copy", "auto"),
        default="auto",
        help="hardlink read-only blobs, copy them, or link where possible (default: auto)",
    )
    restore.add_argument(
        "--replace", action="store_true", help="replace TARGET if it exists and is not empty"
    )
    restore.set_defaults(command=_restore)

    publish = add("publish", "publish a directory as a snapshot under a ref", client, compat)
    publish.add_argument("dir", metavar="DIR")
    publish.add_argument("--ref", metavar="REF", required=True)
    publish.add_argument(
        "--facts",
        metavar="A,B",
        type=_fact_list,
        help="the compat facts the snapshot depends on (default: the daemon's compat_facts)",
    )
    publish.add_argument(
        "--meta",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="metadata to record in the manifest (repeatable)",
    )
    publish.set_defaults(command=_publish)

    prefetch = add("prefetch", "fetch a snapshot into a tier ahead of a restore", client, compat)
    prefetch.add_argument("ref", metavar="REF")
    prefetch.add_argument("--tier", metavar="NAME", help="tier to fill (default: the first)")
    prefetch.set_defaults(command=_prefetch)

    for name, verb in (("pin", "keep"), ("unpin", "stop keeping")):
        pin = add(name, f"{verb} a snapshot in the cache regardless of eviction", client, compat)
        pin.add_argument("ref", metavar="REF", nargs="?")
        pin.add_argument("--snapshot", metavar="ID", help="a snapshot id instead of a REF")
        pin.set_defaults(command=_pin if name == "pin" else _unpin)

    add("ls", "list the snapshots in the cache", client).set_defaults(command=_ls)
    add("status", "show the daemon's state", client).set_defaults(command=_status)
    add("gc", "remove unreferenced blobs and partial files", client).set_defaults(command=_gc)
    add("verify", "re-hash every cached blob", client).set_defaults(command=_verify)
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _fact_list(text: str) -> list[str]:
    return [fact.strip() for fact in text.split(",") if fact.strip()]


# -- commands -------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    config: Path | None = args.config
    if config is None and os.environ.get("HOSTD_CONFIG"):
        config = Path(os.environ["HOSTD_CONFIG"])
    try:
        daemon = importlib.import_module("hostd.daemon")
    except ModuleNotFoundError as exc:
        if exc.name != "hostd.daemon":
            raise
        raise HostdError("this build of hostd has no daemon (hostd.daemon is missing)") from exc
    run: Callable[[Path | None], int] = daemon.main
    return run(config)


def _restore(args: argparse.Namespace) -> int:
    def call(client: Client, progress: ProgressCallback | None) -> JSON:
        return client.restore(
            args.ref,
            args.target,
            mode=args.mode,
            replace=args.replace,
            compat=dict(args.compat),
            on_progress=progress,
        )

    return _run(args, call, _render_restore, progress="restore")


def _publish(args: argparse.Namespace) -> int:
    def call(client: Client, progress: ProgressCallback | None) -> JSON:
        return client.publish(
            args.dir,
            ref=args.ref,
            facts=args.facts,
            compat=dict(args.compat),
            meta=dict(args.meta),
            on_progress=progress,
        )

    return _run(args, call, _render_publish, progress="publish")


def _prefetch(args: argparse.Namespace) -> int:
    def call(client: Client, progress: ProgressCallback | None) -> JSON:
        return client.prefetch(
            args.ref, tier=args.tier, compat=dict(args.compat), on_progress=progress
        )

    return _run(args, call, _render_prefetch, progress="prefetch")


def _pin(args: argparse.Namespace) -> int:
    _check_pin_args(args)
    return _run(
        args,
        lambda client, _: client.pin(
            ref=args.ref, snapshot=args.snapshot, compat=dict(args.compat)
        ),
        _render_pin,
    )


def _unpin(args: argparse.Namespace) -> int:
    _check_pin_args(args)
    return _run(
        args,
        lambda client, _: client.unpin(
            ref=args.ref, snapshot=args.snapshot, compat=dict(args.compat)
        ),
        _render_pin,
    )


def _check_pin_args(args: argparse.Namespace) -> None:
    if (args.ref is None) == (args.snapshot is None):
        raise UsageError("name a REF or a --snapshot ID, one of them")


def _ls(args: argparse.Namespace) -> int:
    return _run(args, lambda client, _: client.snapshots(), _render_ls)


def _status(args: argparse.Namespace) -> int:
    return _run(args, lambda client, _: client.status(), _render_status)


def _gc(args: argparse.Namespace) -> int:
    return _run(args, lambda client, _: client.gc(), _render_gc)


def _verify(args: argparse.Namespace) -> int:
    return _run(
        args,
        lambda client, progress: client.verify(on_progress=progress),
        _render_verify,
        progress="verify",
        verdict=_verify_verdict,
    )


def _verify_verdict(result: JSON) -> HostdError | None:
    # Corruption found is a failed check, as fsck has it: scripts branch on the exit code.
    bad = len(result.get("bad") or [])
    if bad:
        return HostdError(f"verify found {bad} bad blob{'s' if bad != 1 else ''}")
    return None


def _run(
    args: argparse.Namespace,
    call: Call,
    render: Render,
    *,
    progress: str = "",
    verdict: Callable[[JSON], HostdError | None] | None = None,
) -> int:
    """Talk to the daemon, print the result (as JSON, or for a human), then judge it."""
    socket = resolve_socket(args.socket, os.environ)
    show_progress = bool(progress) and output.isatty(sys.stderr)

    with Client(socket) as client:
        if show_progress:
            with output.ProgressBar(sys.stderr, progress) as bar:
                result = call(client, bar.update)
        else:
            result = call(client, None)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        render(output.printer_for(sys.stdout), result)
    sys.stdout.flush()
    failure = verdict(result) if verdict is not None else None
    if failure is not None:
        raise failure
    return 0


# -- rendering ------------------------------------------------------------------------------


def _render_restore(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("target", result.get("target")),
            ("files", count(result.get("files"))),
            ("bytes", size_exact(result.get("bytes"))),
            ("timings", timings(result.get("timings"))),
            ("sources", sources(result.get("bytes_by_source"))),
        ]
    )


def _render_publish(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("files", count(result.get("files"))),
            ("chunks", count(result.get("chunks"))),
            ("bytes", size_exact(result.get("bytes"))),
            ("new chunks", count(result.get("new_chunks"))),
            ("compressed chunks", count(result.get("compressed_chunks"))),
            ("stored", size_exact(result.get("stored_bytes"))),
            ("timings", timings(result.get("timings"))),
        ]
    )


def _render_prefetch(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("tier", result.get("tier")),
            ("bytes", size_exact(result.get("bytes"))),
            ("timings", timings(result.get("timings"))),
            ("sources", sources(result.get("bytes_by_source"))),
        ]
    )


def _render_pin(out: Printer, result: JSON) -> None:
    state = "pinned" if result.get("pinned") else "not pinned"
    out.line(f"{result.get('snapshot')} {state}")


def _render_ls(out: Printer, result: JSON) -> None:
    snapshots: list[JSON] = result.get("snapshots") or []
    if not snapshots:
        out.line("no snapshots")
        return
    out.table(
        ("SNAPSHOT", "REFS", "FILES", "SIZE", "PINNED", "LAST USED", "CACHED", "STATE"),
        [
            (
                str(snap.get("id")),
                ", ".join(str(ref) for ref in snap.get("refs") or []) or "-",
                count(snap.get("files")),
                size(snap.get("bytes")),
                "yes" if snap.get("pinned") else "no",
                output.when(snap.get("last_used")),
                sources(snap.get("tiers")),
                "complete" if snap.get("complete") else "partial",
            )
            for snap in snapshots
        ],
    )


def _render_status(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("version", result.get("version")),
            ("pid", result.get("pid")),
            ("uptime", duration(result.get("uptime"))),
            ("socket", result.get("socket")),
            ("metrics", result.get("metrics_address")),
            ("origin", result.get("origin")),
            ("in flight", count(result.get("in_flight"))),
            ("you", _caller(result.get("caller"))),
        ]
    )
    tiers: list[JSON] = result.get("tiers") or []
    if tiers:
        out.line("")
        out.table(
            ("TIER", "PATH", "USED", "BUDGET", "USE", "BLOBS"),
            [
                (
                    str(tier.get("name")),
                    str(tier.get("path")),
                    size(tier.get("used")),
                    size(tier.get("budget")),
                    _share(tier.get("used"), tier.get("budget")),
                    count(tier.get("blobs")),
                )
                for tier in tiers
            ],
        )
    peers = result.get("peers")
    if isinstance(peers, dict):
        out.line("")
        out.pairs(
            [
                ("peers on", peers.get("listen")),
                ("this host", peers.get("self") or "not in the peer list"),
                ("auth", peers.get("auth")),
            ]
        )
        members: list[JSON] = [m for m in peers.get("members") or [] if isinstance(m, dict)]
        if members:
            out.table(
                ("PEER", "STATE", "FOR", "STRIKES", "LAST ERROR"),
                [
                    (
                        str(m.get("address")),
                        str(m.get("state")),
                        duration(m.get("for_s")),
                        count(m.get("strikes")),
                        str(m.get("last_error") or ""),
                    )
                    for m in members
                ],
            )


def _share(used: object, budget: object) -> str:
    if is_number(used) and is_number(budget) and budget > 0:
        return f"{100 * used / budget:.0f}%"
    return "-"


def _caller(caller: object) -> str | None:
    """The caller the daemon decided for, and what it may do: "uid 1000 gid 1000: restore"."""
    if not isinstance(caller, dict):
        return None
    may = ", ".join(str(c) for c in caller.get("classes") or []) or "nothing"
    return f"uid {caller.get('uid')} gid {caller.get('gid')}: may {may}"


def _render_gc(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("removed blobs", count(result.get("removed_blobs"))),
            ("freed", size_exact(result.get("freed_bytes"))),
            ("removed partials", count(result.get("removed_partials"))),
        ]
    )


def _render_verify(out: Printer, result: JSON) -> None:
    bad: list[JSON] = result.get("bad") or []
    out.pairs(
        [
            ("checked blobs", count(result.get("checked_blobs"))),
            ("checked", size_exact(result.get("checked_bytes"))),
            ("bad blobs", count(len(bad))),
        ]
    )
    if bad:
        out.line("")
        out.table(
            ("BLOB", "TIER", "REASON"),
            [(str(e.get("blob")), str(e.get("tier")), str(e.get("reason"))) for e in bad],
        )


# -- errors -----------------------------------------------------------------------------------


def _explain(exc: HostdError) -> str:
    """The line a user reads for an error: what kind of refusal it is, then the daemon's why."""
    if isinstance(exc, Forbidden):
        return f"forbidden by hostd's [access] config: {exc.message}"
    if isinstance(exc, Busy):
        return f"hostd is busy: {exc.message}"
    return exc.message


def _fail(message: str) -> None:
    """Report a failure: exactly one line on stderr."""
    line = " ".join(message.split())
    sys.stderr.write(f"hostd: {line}\n")
    sys.stderr.flush()
