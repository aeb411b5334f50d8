"""The `hostd` command: `serve` runs the daemon, every other command talks to its socket.

Output contract, which scripts rely on:
- exit 0 ok, 1 failed, 2 usage, 3 not found (no such ref, or no snapshot for this host's
  compat key: boot from scratch and publish), 4 daemon unreachable, 130 interrupted;
- a failure is exactly one line on stderr, `hostd: <message>`;
- `--json` prints the final result as one JSON object on stdout and nothing else there;
- progress bars go to stderr, and only when stderr is a terminal.

This module parses, prints and maps errors to exit codes; what a command means is the
daemon's business, and how to talk to it is client.py's. The daemon module is imported only
by `serve`, so the client commands start fast and work without the daemon's dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TextIO, TypeGuard

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hostd.client import JSON, Client, ProgressCallback, resolve_socket
from hostd.errors import Busy, Forbidden, HostdError, UsageError

EXIT_INTERRUPTED = 130

Call = Callable[[Client, ProgressCallback | None], Awaitable[JSON]]
Render = Callable[[Console, JSON], None]


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
        # asyncio.run has cancelled the command by now, which closed the connection: the
        # daemon sees the client go and cancels the work.
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
    def call(client: Client, progress: ProgressCallback | None) -> Awaitable[JSON]:
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
    def call(client: Client, progress: ProgressCallback | None) -> Awaitable[JSON]:
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
    def call(client: Client, progress: ProgressCallback | None) -> Awaitable[JSON]:
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
    show_progress = bool(progress) and _isatty(sys.stderr)

    async def talk() -> JSON:
        async with Client(socket) as client:
            if not show_progress:
                return await call(client, None)
            with ProgressBar(_console(sys.stderr), progress) as bar:
                return await call(client, bar.update)

    result = asyncio.run(talk())
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        render(_console(sys.stdout), result)
    failure = verdict(result) if verdict is not None else None
    if failure is not None:
        raise failure
    return 0


# -- progress -------------------------------------------------------------------------------


class ProgressBar:
    """Shows a stream's progress events as one rich progress bar (a terminal only).

    The bar restarts when the event's phase changes (resolve, fetch, materialize...), so the
    speed and elapsed time shown are the phase's own.
    """

    def __init__(self, console: Console, title: str) -> None:
        self._title = title
        self._phase = ""
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("{task.fields[files]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(title, total=None, files="")

    def __repr__(self) -> str:
        return f"<ProgressBar {self._title} phase={self._phase or None}>"

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, event: JSON) -> None:
        phase = str(event.get("phase") or self._title)
        total = int(_number(event.get("total_bytes")))
        done = int(_number(event.get("done_bytes")))
        files = ""
        if event.get("total_files"):
            files = f"{_count(event.get('done_files'))}/{_count(event.get('total_files'))} files"
        if phase != self._phase:
            # One call: the refresh thread must not draw the new phase with the old numbers.
            self._phase = phase
            self._progress.reset(
                self._task, total=total or None, completed=done, description=phase, files=files
            )
        else:
            self._progress.update(self._task, total=total or None, completed=done, files=files)


# -- rendering ------------------------------------------------------------------------------


def _render_restore(console: Console, result: JSON) -> None:
    _pairs(
        console,
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("target", result.get("target")),
            ("files", _count(result.get("files"))),
            ("bytes", _size_exact(result.get("bytes"))),
            ("timings", _timings(result.get("timings"))),
            ("sources", _sources(result.get("bytes_by_source"))),
        ],
    )


def _render_publish(console: Console, result: JSON) -> None:
    _pairs(
        console,
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("files", _count(result.get("files"))),
            ("chunks", _count(result.get("chunks"))),
            ("bytes", _size_exact(result.get("bytes"))),
            ("new chunks", _count(result.get("new_chunks"))),
            ("compressed chunks", _count(result.get("compressed_chunks"))),
            ("stored", _size_exact(result.get("stored_bytes"))),
            ("timings", _timings(result.get("timings"))),
        ],
    )


def _render_prefetch(console: Console, result: JSON) -> None:
    _pairs(
        console,
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("tier", result.get("tier")),
            ("bytes", _size_exact(result.get("bytes"))),
            ("timings", _timings(result.get("timings"))),
            ("sources", _sources(result.get("bytes_by_source"))),
        ],
    )


def _render_pin(console: Console, result: JSON) -> None:
    state = "pinned" if result.get("pinned") else "not pinned"
    _print(console, f"{result.get('snapshot')} {state}")


def _render_ls(console: Console, result: JSON) -> None:
    snapshots: list[JSON] = result.get("snapshots") or []
    if not snapshots:
        _print(console, "no snapshots")
        return
    table = _table("SNAPSHOT", "REFS", "FILES", "SIZE", "PINNED", "LAST USED", "CACHED", "STATE")
    for snap in snapshots:
        table.add_row(
            str(snap.get("id")),
            ", ".join(str(ref) for ref in snap.get("refs") or []) or "-",
            _count(snap.get("files")),
            _size(snap.get("bytes")),
            "yes" if snap.get("pinned") else "no",
            _when(snap.get("last_used")),
            _sources(snap.get("tiers")),
            "complete" if snap.get("complete") else "partial",
        )
    _print(console, table)


def _render_status(console: Console, result: JSON) -> None:
    _pairs(
        console,
        [
            ("version", result.get("version")),
            ("pid", result.get("pid")),
            ("uptime", _duration(result.get("uptime"))),
            ("socket", result.get("socket")),
            ("metrics", result.get("metrics_address")),
            ("origin", result.get("origin")),
            ("in flight", _count(result.get("in_flight"))),
            ("you", _caller(result.get("caller"))),
        ],
    )
    tiers: list[JSON] = result.get("tiers") or []
    if tiers:
        _print(console, "")
        table = _table("TIER", "PATH", "USED", "BUDGET", "USE", "BLOBS")
        for tier in tiers:
            used, budget = tier.get("used"), tier.get("budget")
            share = "-"
            if _is_number(used) and _is_number(budget) and budget > 0:
                share = f"{100 * used / budget:.0f}%"
            table.add_row(
                str(tier.get("name")),
                str(tier.get("path")),
                _size(used),
                _size(budget),
                share,
                _count(tier.get("blobs")),
            )
        _print(console, table)
    peers = result.get("peers")
    if isinstance(peers, dict):
        _print(console, "")
        _pairs(
            console,
            [
                ("peers on", peers.get("listen")),
                ("this host", peers.get("self") or "not in the peer list"),
                ("auth", peers.get("auth")),
            ],
        )
        members: list[JSON] = [m for m in peers.get("members") or [] if isinstance(m, dict)]
        if members:
            table = _table("PEER", "STATE", "FOR", "STRIKES", "LAST ERROR")
            for m in members:
                table.add_row(
                    str(m.get("address")),
                    str(m.get("state")),
                    _duration(m.get("for_s")),
                    _count(m.get("strikes")),
                    str(m.get("last_error") or ""),
                )
            _print(console, table)


def _caller(caller: object) -> str | None:
    """The caller the daemon decided for, and what it may do: "uid 1000 gid 1000: restore"."""
    if not isinstance(caller, dict):
        return None
    may = ", ".join(str(c) for c in caller.get("classes") or []) or "nothing"
    return f"uid {caller.get('uid')} gid {caller.get('gid')}: may {may}"


def _render_gc(console: Console, result: JSON) -> None:
    _pairs(
        console,
        [
            ("removed blobs", _count(result.get("removed_blobs"))),
            ("freed", _size_exact(result.get("freed_bytes"))),
            ("removed partials", _count(result.get("removed_partials"))),
        ],
    )


def _render_verify(console: Console, result: JSON) -> None:
    bad: list[JSON] = result.get("bad") or []
    _pairs(
        console,
        [
            ("checked blobs", _count(result.get("checked_blobs"))),
            ("checked", _size_exact(result.get("checked_bytes"))),
            ("bad blobs", _count(len(bad))),
        ],
    )
    if bad:
        _print(console, "")
        table = _table("BLOB", "TIER", "REASON")
        for entry in bad:
            table.add_row(str(entry.get("blob")), str(entry.get("tier")), str(entry.get("reason")))
        _print(console, table)


# -- formatting -----------------------------------------------------------------------------


def _console(stream: TextIO) -> Console:
    tty = _isatty(stream)
    return Console(
        file=stream,
        force_terminal=tty,  # not a terminal: no control codes, whatever the environment says
        color_system="auto" if tty else None,
        width=None if tty else 1000,  # a pipe gets whole lines, not 80 columns
        markup=False,  # refs, paths and messages are text, not rich markup
        highlight=False,
        emoji=False,
        soft_wrap=not tty,
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


def _print(console: Console, renderable: RenderableType) -> None:
    if console.is_terminal:
        console.print(renderable)
        return
    # A pipe or a file: rich pads cells to the column width; trailing blanks help nobody.
    with console.capture() as captured:
        console.print(renderable)
    console.file.write("\n".join(line.rstrip() for line in captured.get().split("\n")))


def _pairs(console: Console, rows: Iterable[tuple[str, object]]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, "-" if value is None or value == "" else str(value))
    _print(console, grid)


def _table(*headers: str) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 2), header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: object) -> float:
    return float(value) if _is_number(value) else 0.0


def _count(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _size(value: object) -> str:
    if not _is_number(value):
        return "-" if value is None else str(value)
    amount, units = _number(value), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while abs(amount) >= 1024 and len(units) > 1:
        amount /= 1024
        units.pop(0)
    return f"{amount:.0f} B" if units[0] == "B" else f"{amount:.1f} {units[0]}"


def _size_exact(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024:
        return f"{_size(value)} ({value:,} bytes)"
    return _size(value)


def _seconds(value: object) -> str:
    if not _is_number(value):
        return str(value)
    amount = _number(value)
    return f"{amount:.3f} s" if amount < 10 else f"{amount:.1f} s"


def _timings(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    known = [key for key in ("resolve", "hash", "fetch", "upload", "materialize") if key in value]
    others = [key for key in value if key not in known and key != "total"]
    order = known + others + (["total"] if "total" in value else [])
    return ", ".join(f"{key} {_seconds(value[key])}" for key in order)


def _sources(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    return ", ".join(f"{key} {_size(amount)}" for key, amount in value.items())


def _duration(value: object) -> str:
    if not _is_number(value):
        return "-" if value is None else str(value)
    seconds = int(_number(value))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _when(value: object) -> str:
    if _is_number(value):  # seconds since the epoch
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_number(value)))
    return "never" if value is None else str(value)


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
