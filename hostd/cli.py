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
asyncio or aiohttp, and rich only to draw on a terminal; not even typing, pathlib or
socket.py (the client's modules name types under a `TYPE_CHECKING = False` constant, for
the checker alone). tests/test_cli.py checks it. So a client command starts in under three
times the interpreter's own start, and works without the daemon's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import time

from hostd import __version__, output, snapview
from hostd.client import Client, resolve_socket
from hostd.errors import Busy, Forbidden, HostdError, TargetExists, UsageError
from hostd.output import count, duration, is_number, size, size_exact, sources, timings

# Types for the checker alone: typing and pathlib cost a client command ~6 ms of imports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from hostd.client import JSON, ProgressCallback
    from hostd.output import Printer

    Call = Callable[[Client, ProgressCallback | None], JSON]
    Render = Callable[[Printer, JSON], None]

EXIT_INTERRUPTED = 130
LS_WIDTH = 100  # `hostd ls` fits this many columns; `--wide` does not try
LS_GAP = 2  # between its columns
# The snapshot kinds (core/compat.py's KINDS, which this module does not import: it pulls in
# the manifest codec, and every client command pays for its imports).
KINDS = ("files", "compile-cache", "process")

# Every command (build_parser adds each; a test checks this list against it).
COMMANDS = frozenset(
    (
        *("serve", "restore", "publish", "prefetch", "pin", "unpin", "ls", "status", "gc"),
        *("verify", "version", "rm", "prune", "refs", "inspect", "ref"),
    )
)


def main(argv: list[str] | None = None) -> int:
    """Run one `hostd` command and return its exit code."""
    raw = sys.argv[1:] if argv is None else argv
    command_word = _command_in(raw)
    if command_word is None and "--version" in raw and "--json" in raw:
        return _version(argparse.Namespace(json=True))  # (as `hostd version --json`)
    parser = build_parser(command_word)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (already reported) or --help
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except HostdError as exc:
        _fail(_explain(exc, args))
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


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, less shutil: argparse makes one to check every option it
    is given, and finds the terminal's width with shutil, whose import (bz2, lzma, fnmatch)
    costs a client command ~2 ms. The width comes out as shutil's get_terminal_size gives it."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _columns() - 2  # (argparse's own margin)
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size().columns tells it: $COLUMNS, else
    stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    out = sys.__stdout__
    try:
        return (out is not None and os.get_terminal_size(out.fileno()).columns) or 80
    except (ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, like every other failure."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("hostd").strip()
        _fail(f"{where + ': ' if where else ''}{message} (see '{self.prog} --help')")
        self.exit(2)


def _command_in(argv: list[str]) -> str | None:
    """The command `argv` names (its first word that is not a main-parser flag or its
    value); None where there is none, or where the main parser's help is asked for first
    (`hostd --help status` lists every command)."""
    words = iter(argv)
    for w in words:
        # (argparse takes a long flag's unique prefix too: `--sock S`, `--he`)
        if w == "--socket" or (len(w) > 2 and "--socket".startswith(w)):
            next(words, None)
        elif w == "-h" or (len(w) > 2 and "--help".startswith(w)):
            return None
        elif not w.startswith("-"):
            return w
    return None


class _Unused:
    """Stands in for the parser of a command this run does not name: what it is told is
    dropped (argparse's parsers and add_argument calls cost a client command milliseconds
    it need not pay). `hostd --help`, which names no command, still lists every one."""

    def __getattr__(self, _name: str) -> Callable[..., _Unused]:
        return lambda *_args, **_kwargs: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with `only`, a known command, that command's options alone (the
    others are named, with their summaries, and nothing more)."""
    parser = _Parser(
        prog="hostd",
        description="Snapshot daemon for GPU hosts, and the client that talks to it.",
    )
    parser.add_argument(
        "--version", action="version", version=f"hostd {__version__}", help="show the version"
    )
    commands = parser.add_subparsers(
        metavar="COMMAND", required=True, help="what to do (`hostd COMMAND --help` for its options)"
    )

    # The client flags go before or after the command (`hostd --socket S ls`, `hostd ls
    # --socket S`): the main parser holds them with their defaults, and each command's copy
    # defaults to SUPPRESS, so a command sets them only when given there; given in both
    # places, the one after the command wins. A command added with the `client` parent
    # gets both positions without doing anything.
    _client_flags(parser, default_socket=None, default_json=False)
    client = _Parser(add_help=False)
    _client_flags(client, default_socket=argparse.SUPPRESS, default_json=argparse.SUPPRESS)
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
        if only is not None and name != only and only in COMMANDS:
            return _Unused()  # type: ignore[return-value]
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=summary, parents=list(parents)
        )
        return sub

    serve = add("serve", "run the daemon")
    serve.add_argument("--config", metavar="FILE", help="TOML config (default: $HOSTD_CONFIG)")
    serve.set_defaults(command=_serve)

    restore = add("restore", "restore a snapshot into a directory", client, compat)
    restore.add_argument("ref", metavar="REF", help="the ref to restore, e.g. models/llama")
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
    restore.add_argument(
        "--progressive",
        action="store_true",
        help="make TARGET at once and land each file in it as soon as it is verified, printing "
        "its path (with --json: its `file` event) as it lands",
    )
    restore.add_argument(
        "--order",
        metavar="GLOB",
        action="append",
        default=[],
        help="with --progressive: fetch files matching this first (repeatable, in order)",
    )
    restore.add_argument(
        "--keep-partial",
        action="store_true",
        help="with --progressive: a failed restore keeps the files that landed",
    )
    restore.set_defaults(command=_restore)

    publish = add("publish", "publish a directory as a snapshot under a ref", client, compat)
    publish.add_argument("dir", metavar="DIR", help="the directory to publish")
    publish.add_argument(
        "--ref", metavar="REF", required=True, help="the ref to point at it, e.g. models/llama"
    )
    chosen = publish.add_mutually_exclusive_group()
    chosen.add_argument(
        "--kind",
        choices=KINDS,
        help="what the snapshot is, which picks the compat facts it is keyed on: files (weights, "
        "portable trees: format alone; the default), compile-cache (GPU model, driver major, "
        "CUDA, arch), process (also the exact driver and the kernel)",
    )
    chosen.add_argument(
        "--facts",
        metavar="A,B",
        type=_fact_list,
        help="the compat facts the snapshot depends on, instead of a kind's",
    )
    publish.add_argument(
        "--meta",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="metadata to record in the manifest (repeatable)",
    )
    publish.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        default=[],
        help="leave out what matches, relative to DIR (repeatable); a name without '/' "
        "matches at any depth (*.pyc), one with '/' from DIR's top (logs/*.txt), '**' any "
        "directories; an excluded directory is not read",
    )
    publish.add_argument(
        "--include",
        metavar="GLOB",
        action="append",
        default=[],
        help="publish only what matches (repeatable; same patterns; --exclude wins)",
    )
    publish.add_argument(
        "--force",
        action="store_true",
        help="move the ref even if DIR is empty or has under half the files or bytes of the "
        "ref's current snapshot",
    )
    publish.set_defaults(command=_publish)

    prefetch = add("prefetch", "fetch a snapshot into a tier ahead of a restore", client, compat)
    prefetch.add_argument("ref", metavar="REF", help="the ref to fetch")
    prefetch.add_argument(
        "--tier",
        metavar="NAME",
        help="tier to fill (default: the first with room, as restores do; the result says where "
        "its blobs are)",
    )
    prefetch.set_defaults(command=_prefetch)

    for name, verb in (("pin", "keep"), ("unpin", "stop keeping")):
        pin = add(name, f"{verb} a snapshot in the cache regardless of eviction", client, compat)
        pin.add_argument("ref", metavar="REF", nargs="?", help="the ref whose snapshot it is")
        pin.add_argument(
            "--snapshot", metavar="ID", help="a snapshot id (or unique prefix) instead of a REF"
        )
        pin.set_defaults(command=_pin if name == "pin" else _unpin)

    ls = add("ls", "list the snapshots in the cache", client)
    ls.add_argument(
        "--wide", action="store_true", help="full ids, every ref, exact times and tier sizes"
    )
    ls.set_defaults(command=_ls)
    add("status", "show the daemon's state", client).set_defaults(command=_status)
    add("gc", "remove unreferenced blobs and partial files", client).set_defaults(command=_gc)
    add("verify", "re-hash every cached blob", client).set_defaults(command=_verify)
    _snapshot_commands(add, client, compat)
    version = add("version", "show the version of this hostd command")
    version.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help='print {"version": ...}'
    )
    version.set_defaults(command=_version)
    return parser


def _snapshot_commands(
    add: Callable[..., argparse.ArgumentParser], client: _Parser, compat: _Parser
) -> None:
    """rm, prune, refs, inspect, ref history|set (hostd/prune.py, hostd/refs.py)."""
    rm = add("rm", "forget cached snapshots and remove the blobs only they use", client)
    rm.add_argument(
        "names",
        metavar="REF|ID",
        nargs="+",
        help="a ref (every snapshot this host resolved it to) or a snapshot id or unique "
        "prefix; a pinned one is refused until it is unpinned",
    )
    rm.set_defaults(command=_rm)
    prune = add("prune", "forget cached snapshots by policy (pinned ones stay)", client)
    prune.add_argument(
        "--keep",
        metavar="N",
        type=_count,
        help="keep the N snapshots each ref was most recently resolved to on this host",
    )
    prune.add_argument(
        "--unused-for",
        metavar="DURATION",
        type=_duration,
        help="drop snapshots not used for this long (30m, 12h, 7d, 2w); with --keep, only "
        "those beyond the newest N",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="show what would go, and change nothing"
    )
    prune.set_defaults(command=_prune)
    refs = add("refs", "list the refs at the origin", client)
    refs.add_argument(
        "prefix", metavar="PREFIX", nargs="?", default="", help="only refs whose name starts so"
    )
    refs.set_defaults(command=_refs)
    inspect = add("inspect", "show a snapshot's manifest: summary and files", client, compat)
    inspect.add_argument(
        "name",
        metavar="REF|ID",
        help="a ref (resolved for this host) or a snapshot id or unique prefix",
    )
    inspect.set_defaults(command=_inspect)
    ref = add("ref", "a ref's history at the origin, and rolling it back", client)
    ref.add_argument(
        "action",
        choices=("history", "set"),
        help="history: list what REF pointed at; set: point REF at ID (a new history entry)",
    )
    ref.add_argument("ref", metavar="REF", help="the ref, e.g. models/llama")
    ref.add_argument(
        "snapshot",
        metavar="ID",
        nargs="?",
        help="for set: the snapshot id (or unique prefix) to point REF at",
    )
    ref.add_argument(
        "--limit", metavar="N", type=_count, help="for history: entries per compat key (20)"
    )
    ref.set_defaults(command=_ref)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _duration(text: str) -> float:
    from hostd.core.select import parse_age  # only when given: a few ms of imports

    try:
        return parse_age(text)
    except HostdError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _client_flags(
    parser: argparse.ArgumentParser, *, default_socket: object, default_json: object
) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default_socket,
        help="the daemon's socket (default: $HOSTD_SOCKET, else the per-user or system one)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default_json,
        help="print the result as one JSON object on stdout",
    )


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _pairs(flag: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The KEY=VALUE pairs of a repeatable flag; a key given twice with two values is a
    usage error (which one was meant?), not the last one silently."""
    out: dict[str, str] = {}
    for key, value in pairs:
        if out.setdefault(key, value) != value:
            raise UsageError(f"{flag}: {key!r} given twice, as {out[key]!r} and {value!r}")
    return out


def _fact_list(text: str) -> list[str]:
    return [fact.strip() for fact in text.split(",") if fact.strip()]


# -- commands -------------------------------------------------------------------------------


def _version(args: argparse.Namespace) -> int:
    if args.json:
        sys.stdout.write(json.dumps({"version": __version__}) + "\n")
    else:
        sys.stdout.write(f"hostd {__version__}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.socket is not None or args.json:
        raise UsageError("--socket and --json are for the client commands; serve takes --config")
    from pathlib import Path

    given: str | None = args.config
    if given is None:
        given = os.environ.get("HOSTD_CONFIG") or None
    config = None if given is None else Path(given)
    try:
        daemon = importlib.import_module("hostd.daemon")
    except ModuleNotFoundError as exc:
        if exc.name != "hostd.daemon":
            raise
        raise HostdError("this build of hostd has no daemon (hostd.daemon is missing)") from exc
    run: Callable[[Path | None], int] = daemon.main
    return run(config)


def _restore(args: argparse.Namespace) -> int:
    if (args.order or args.keep_partial) and not args.progressive:
        raise UsageError("--order and --keep-partial need --progressive")

    def landed(event: JSON) -> None:
        # a path is the publisher's: its control characters would drive the caller's terminal
        line = json.dumps(event) if args.json else output.plain(str(event.get("path")))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def call(client: Client, progress: ProgressCallback | None) -> JSON:
        return client.restore(
            args.ref,
            args.target,
            mode=args.mode,
            replace=args.replace,
            compat=_pairs("--compat", args.compat),
            on_progress=progress,
            progressive=args.progressive,
            keep_partial=args.keep_partial,
            order=args.order,
            on_file=landed if args.progressive else None,
        )

    return _run(args, call, _render_restore, progress="restore")


def _publish(args: argparse.Namespace) -> int:
    def call(client: Client, progress: ProgressCallback | None) -> JSON:
        return client.publish(
            args.dir,
            ref=args.ref,
            kind=args.kind,
            facts=args.facts,
            compat=_pairs("--compat", args.compat),
            meta=_pairs("--meta", args.meta),
            include=args.include,
            exclude=args.exclude,
            force=args.force,
            on_progress=progress,
        )

    return _run(args, call, _render_publish, progress="publish", warn=_publish_warnings)


def _publish_warnings(result: JSON) -> list[str]:
    return [
        f"skipped {e.get('path')!r}: a {e.get('kind')}, not published (never opened)"
        for e in result.get("skipped") or []
        if isinstance(e, dict)
    ] + [str(w) for w in result.get("warnings") or []]


def _prefetch(args: argparse.Namespace) -> int:
    def call(client: Client, progress: ProgressCallback | None) -> JSON:
        return client.prefetch(
            args.ref, tier=args.tier, compat=_pairs("--compat", args.compat), on_progress=progress
        )

    return _run(args, call, _render_prefetch, progress="prefetch")


def _pin(args: argparse.Namespace) -> int:
    _check_pin_args(args)
    return _run(
        args,
        lambda client, _: client.pin(
            ref=args.ref, snapshot=args.snapshot, compat=_pairs("--compat", args.compat)
        ),
        _render_pin,
    )


def _unpin(args: argparse.Namespace) -> int:
    _check_pin_args(args)
    return _run(
        args,
        lambda client, _: client.unpin(
            ref=args.ref, snapshot=args.snapshot, compat=_pairs("--compat", args.compat)
        ),
        _render_pin,
    )


def _check_pin_args(args: argparse.Namespace) -> None:
    if (args.ref is None) == (args.snapshot is None):
        raise UsageError("name a REF or a --snapshot ID, one of them")


def _ls(args: argparse.Namespace) -> int:
    render = _render_ls_wide if args.wide else _render_ls
    return _run(args, lambda client, _: client.snapshots(), render)


def _status(args: argparse.Namespace) -> int:
    return _run(args, lambda client, _: client.status(), _render_status)


def _rm(args: argparse.Namespace) -> int:
    return _run(args, lambda client, _: client.rm(args.names), snapview.render_rm)


def _prune(args: argparse.Namespace) -> int:
    if args.keep is None and args.unused_for is None:
        raise UsageError("say what to prune: --keep N, --unused-for DURATION, or both")
    return _run(
        args,
        lambda client, _: client.prune(
            keep=args.keep, unused_for=args.unused_for, dry_run=args.dry_run
        ),
        snapview.render_prune,
    )


def _refs(args: argparse.Namespace) -> int:
    return _run(args, lambda client, _: client.refs(args.prefix), snapview.render_refs)


def _inspect(args: argparse.Namespace) -> int:
    return _run(
        args,
        lambda client, _: client.inspect(args.name, compat=_pairs("--compat", args.compat)),
        snapview.render_inspect,
    )


def _ref(args: argparse.Namespace) -> int:
    if args.action == "set":
        if args.snapshot is None or args.limit is not None:
            raise UsageError("usage: hostd ref set REF ID")
        return _run(
            args, lambda client, _: client.ref_set(args.ref, args.snapshot), snapview.render_ref_set
        )
    if args.snapshot is not None:
        raise UsageError("usage: hostd ref history REF [--limit N]")
    return _run(
        args,
        lambda client, _: client.ref_history(args.ref, limit=args.limit),
        snapview.render_history,
    )


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
    warn: Callable[[JSON], list[str]] | None = None,
) -> int:
    """Talk to the daemon, print the result (as JSON, or for a human), then judge it.
    `warn`: lines the result gives to say on stderr (`hostd: warning: ...`), JSON or not."""
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
    for line in warn(result) if warn is not None else []:
        _fail(f"warning: {line}")
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
            ("mode", _how_restored(result)),
            ("timings", timings(result.get("timings"))),
            ("sources", sources(result.get("bytes_by_source"))),
        ]
        + (
            [("note", "the origin did not answer: used the ref's last known snapshot")]
            if result.get("stale_ref")
            else []
        )
    )


def _how_restored(result: JSON) -> str | None:
    """What the mode did with the files: "link: 12 linked, 3 copied (1 for its mtime)"."""
    mode = result.get("mode")
    if mode is None:
        return None
    parts = [f"{count(result.get('linked'))} linked"] if mode != "copy" else []
    copied = f"{count(result.get('copied'))} copied"
    if result.get("copied_for_mtime"):
        copied += f" ({count(result.get('copied_for_mtime'))} for its mtime)"
    return f"{mode}: {', '.join([*parts, copied])}"


def _facts_line(facts: object) -> str:
    if not isinstance(facts, dict):
        return "-"
    return ", ".join(f"{k}={v}" for k, v in facts.items())


def _render_publish(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("kind", result.get("kind") or "own facts"),
            ("compat", _facts_line(result.get("compat"))),
            ("files", count(result.get("files"))),
            ("chunks", count(result.get("chunks"))),
            ("bytes", size_exact(result.get("bytes"))),
            ("new chunks", count(result.get("new_chunks"))),
            ("compressed chunks", count(result.get("compressed_chunks"))),
            ("stored", size_exact(result.get("stored_bytes"))),
            ("skipped", _skipped(result.get("skipped"))),
            ("timings", timings(result.get("timings"))),
        ]
    )


def _skipped(entries: object) -> str | None:
    if not isinstance(entries, list) or not entries:
        return None
    return ", ".join(f"{e.get('path')} ({e.get('kind')})" for e in entries if isinstance(e, dict))


def _render_prefetch(out: Printer, result: JSON) -> None:
    out.pairs(
        [
            ("snapshot", result.get("snapshot")),
            ("ref", result.get("ref")),
            ("tier", result.get("tier") or "the first with room"),
            # where its blobs are now, a blob in two tiers in both (an older daemon: absent)
            ("held", sources(result.get("tiers"))),
            ("bytes", size_exact(result.get("bytes"))),
            ("timings", timings(result.get("timings"))),
            ("sources", sources(result.get("bytes_by_source"))),
        ]
    )


def _render_pin(out: Printer, result: JSON) -> None:
    state = "pinned" if result.get("pinned") else "unpinned"
    out.line(f"{result.get('snapshot')} {state}")


def _render_ls(out: Printer, result: JSON) -> None:
    """Fits LS_WIDTH columns: short ids, tier names, times as ages, refs shortened to fit."""
    snapshots: list[JSON] = result.get("snapshots") or []
    if not snapshots:
        out.line("no snapshots")
        return
    now = time.time()
    headers = ("SNAPSHOT", "REFS", "FILES", "SIZE", "PINNED", "LAST USED", "CACHED", "STATE")
    rows = [
        [
            output.short_id(snap.get("id")),
            "",  # the refs, once the other columns have taken their room
            count(snap.get("files")),
            size(snap.get("bytes")),
            "yes" if snap.get("pinned") else "no",
            output.ago(snap.get("last_used"), now),
            output.tier_names(snap.get("tiers")),
            "complete" if snap.get("complete") else "partial",
        ]
        for snap in snapshots
    ]
    room = output.room(headers, rows, column=1, total=LS_WIDTH, gap=LS_GAP)
    for row, snap in zip(rows, snapshots, strict=True):
        row[1] = output.fit_list([str(ref) for ref in snap.get("refs") or []], room) or "-"
    out.table(headers, rows, gap=LS_GAP)


def _render_ls_wide(out: Printer, result: JSON) -> None:
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
            *_host(result.get("host")),
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
        for tier in tiers:
            room, budget = tier.get("room"), tier.get("budget")
            if is_number(room) and is_number(budget) and room < budget:
                out.line(
                    f"tier {tier.get('name')}: its filesystem leaves it room for {size(room)} "
                    f"of its {size(budget)} budget (something else writes there, or the "
                    "budget is over the filesystem's size)"
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


def _host(host: object) -> list[tuple[str, str]]:
    """The host's facts in two lines: "x86_64, kernel 6.1.0, format 2" and "8 x NVIDIA H100
    80GB HBM3, 81559 MiB, MIG off; driver 550.54.15, CUDA 12.4", or "none (why)" without
    NVML. None from a daemon that does not report them."""
    if not isinstance(host, dict) or not isinstance(facts := host.get("facts"), dict):
        return []
    machine = f"{facts.get('arch')}, kernel {facts.get('kernel')}, format {facts.get('format')}"
    if host.get("nvml") != "ok":
        return [("host", machine), ("GPUs", f"none ({host.get('nvml')})")]
    models: dict[str, int] = {}
    for gpu in host.get("gpus") or []:
        name = str(gpu.get("name") or "unknown model") if isinstance(gpu, dict) else "?"
        models[name] = models.get(name, 0) + 1
    if models:
        seen = " + ".join(f"{n} x {name}" for name, n in models.items())
        memory, mig = facts.get("gpu_memory"), facts.get("mig")
        seen += f", {memory} MiB" if memory != "none" else ", memory unknown"
        seen += f", MIG {mig if mig != 'none' else 'unknown'}"
    else:
        seen = "none (NVML sees no GPU)"
    driver = f"driver {facts.get('driver')}, CUDA {facts.get('cuda')}"
    return [("host", machine), ("GPUs", f"{seen}; {driver}")]


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


# The request fields a command's flags fill: a bad_request names the field, the user the flag.
_FLAGS = {
    "tier": "--tier",
    "mode": "--mode",
    "exclude": "--exclude",
    "include": "--include",
    "limit": "--limit",
    "facts": "--facts",
}
_FIELD = re.compile(r"field '(\w+)':? (.*)", re.DOTALL)


def _explain(exc: HostdError, args: argparse.Namespace | None = None) -> str:
    """The line a user reads for an error: what kind of refusal it is, then the daemon's why.
    The API names a request field ("field 'tier': no tier named..."): a user reads the flag."""
    field = _FIELD.match(exc.message) if isinstance(exc, UsageError) else None
    if field is not None and field[1] in _FLAGS:
        flag, reason = _FLAGS[field[1]], field[2]
        given = getattr(args, field[1], None)
        if isinstance(given, list):
            given = " ".join(given)
        return f"{flag} {given}: {reason}" if given else f"{flag}: {reason}"
    if isinstance(exc, TargetExists):
        if args is not None and getattr(args, "progressive", False):
            # (refused with --replace: the old tree cannot stay whole while files land)
            if "not empty" in exc.message:
                return f"{exc.message}; remove it first: a progressive restore fills an empty one"
            return exc.message
        return f"{exc.message}; --replace swaps it for the new tree"
    if isinstance(exc, Forbidden):
        # (403: [access] refusing, whose messages name it and the key, or the caller's own
        # rights: a target where it may not write)
        return f"forbidden: {exc.message}"
    if isinstance(exc, Busy):
        return f"hostd is busy: {exc.message}"
    return exc.message


def _fail(message: str) -> None:
    """Report a failure: exactly one line on stderr."""
    line = " ".join(message.split())
    sys.stderr.write(f"hostd: {line}\n")
    sys.stderr.flush()
