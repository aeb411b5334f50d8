"""How client commands show things to people: values formatted, lines, key/value pairs and
tables printed, and progress bars.

On a pipe or a file, output is plain aligned text made here: whole lines, no control codes,
no trailing blanks, and no rich, whose import costs more than the rest of a client command
(about 50 ms). On a terminal, rich prints the same rows with bold keys and headers, wrapped to
the terminal's width, and draws progress bars; it is imported only then. What the rows say
is cli.py's business; this module must not talk to the daemon.
"""

from __future__ import annotations

import time

# Types for the checker alone (typing costs a client command ~2 ms of imports).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import TracebackType
    from typing import Any, Protocol, TextIO, TypeGuard

    from rich.console import Console
    from rich.progress import ProgressColumn

    class Printer(Protocol):
        """Where a command's human output goes."""

        def line(self, text: str) -> None: ...

        def pairs(self, rows: Iterable[tuple[str, object]]) -> None:
            """Keys and their values, aligned; None or "" shows as "-"."""

        def table(
            self, headers: Sequence[str], rows: Iterable[Sequence[str]], *, gap: int = ...
        ) -> None: ...


PAIRS_GAP = 2  # between a key and its value
TABLE_GAP = 4  # between table columns

# Control characters would break a line into two, or drive the terminal reading a log (C1's
# CSI among them), and bidi overrides make a name read as another: a cell or line of plain
# output shows each as "?", as ls does.
_CONTROL = {
    code: "?"
    for code in (*range(32), *range(127, 160), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def plain(text: str) -> str:
    """`text` with each control character shown as "?": safe on one line of a terminal."""
    return text.translate(_CONTROL)


def printer_for(stream: TextIO) -> Printer:
    return RichPrinter(stream) if isatty(stream) else PlainPrinter(stream)


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


class PlainPrinter:
    """Aligned plain text, for pipes and files: what a script parses."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __repr__(self) -> str:
        return f"<PlainPrinter {getattr(self._stream, 'name', self._stream)!r}>"

    def line(self, text: str) -> None:
        self._stream.write(plain(text) + "\n")

    def pairs(self, rows: Iterable[tuple[str, object]]) -> None:
        self._write(align([[key, _value(value)] for key, value in rows], PAIRS_GAP))

    def table(
        self, headers: Sequence[str], rows: Iterable[Sequence[str]], *, gap: int = TABLE_GAP
    ) -> None:
        self._write(align([list(headers), *(list(row) for row in rows)], gap))

    def _write(self, lines: list[str]) -> None:
        self._stream.write("".join(line + "\n" for line in lines))


def align(rows: list[list[str]], gap: int) -> list[str]:
    """Rows of cells as lines, each column as wide as its widest cell, then `gap` spaces."""
    rows = [[plain(cell) for cell in row] for row in rows]
    columns = max((len(row) for row in rows), default=0)
    widths = [
        max((width(row[i]) for row in rows if i < len(row)), default=0) for i in range(columns)
    ]
    return [
        "".join(cell + " " * (widths[i] - width(cell) + gap) for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]


def width(text: str) -> int:
    """Terminal cells `text` takes: wide East Asian characters two, combining marks none."""
    if text.isascii():
        return len(text)
    import unicodedata  # only for the rare cell that needs it

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


class RichPrinter:
    """rich on a terminal: bold keys and headers, cells folded to the terminal's width."""

    def __init__(self, stream: TextIO) -> None:
        self._console = terminal_console(stream)

    def __repr__(self) -> str:
        return f"<RichPrinter width={self._console.width}>"

    def line(self, text: str) -> None:
        self._console.print(text)

    def pairs(self, rows: Iterable[tuple[str, object]]) -> None:
        from rich.table import Table

        grid = Table.grid(padding=(0, PAIRS_GAP))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        for key, value in rows:
            grid.add_row(key, _value(value))
        self._console.print(grid)

    def table(
        self, headers: Sequence[str], rows: Iterable[Sequence[str]], *, gap: int = TABLE_GAP
    ) -> None:
        from rich.table import Table

        padding = (0, gap - gap // 2, 0, gap // 2)  # right, then the next column's left
        table = Table(box=None, pad_edge=False, padding=padding, header_style="bold")
        for header in headers:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self._console.print(table)


def terminal_console(stream: TextIO) -> Console:
    """A rich console for a terminal: refs, paths and messages are text, not markup."""
    from rich.console import Console

    return Console(file=stream, force_terminal=True, markup=False, highlight=False, emoji=False)


def _value(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


# -- progress -------------------------------------------------------------------------------


class ProgressBar:
    """Shows a stream's progress events as one rich progress bar, on a terminal's stderr.

    The bar restarts when the event's phase changes (resolve, fetch, materialize...), so the
    speed and elapsed time shown are the phase's own. A phase counts bytes (in binary units,
    the speed too: MiB with MiB/s), or files where files are its work (FILE_PHASES, or no
    bytes to count): the bar then moves as each file completes. A byte phase whose files
    complete too (a publish hashing them) shows them beside the bar.
    """

    def __init__(self, stream: TextIO, title: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._title = title
        self._phase = ("", "")
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            *_amount_columns(),
            TextColumn("{task.fields[files]}"),
            TimeElapsedColumn(),
            console=terminal_console(stream),
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(title, total=None, files="", unit="bytes")

    def __repr__(self) -> str:
        return f"<ProgressBar {self._title} phase={self._phase[0] or None}>"

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

    def update(self, event: dict[str, Any]) -> None:
        phase = str(event.get("phase") or self._title)
        total_bytes = int(number(event.get("total_bytes")))
        total_files = int(number(event.get("total_files")))
        done_files = int(number(event.get("done_files")))
        if total_files and (phase in FILE_PHASES or not total_bytes):
            unit, total, done, files = "files", total_files, done_files, ""
        else:
            unit, total, done = "bytes", total_bytes, int(number(event.get("done_bytes")))
            # files beside the bar only once some complete: a fetch completes none
            files = f"{count(done_files)}/{count(total_files)} files" if done_files else ""
        retry = event.get("retry")
        if isinstance(retry, dict) and retry.get("message"):
            # "origin not answering (connection refused), retry 3/5 in 2.0 s", while it lasts
            files = str(retry["message"])
        if (phase, unit) != self._phase:
            # One call: the refresh thread must not draw the new phase with the old numbers.
            self._phase = (phase, unit)
            self._progress.reset(
                self._task,
                total=total or None,
                completed=done,
                description=phase,
                files=files,
                unit=unit,
            )
        else:
            self._progress.update(self._task, total=total or None, completed=done, files=files)


FILE_PHASES = frozenset({"materialize"})  # phases whose work is files, not bytes


def _amount_columns() -> list[ProgressColumn]:
    """The bar's done/total and speed columns, in the task's unit (rich imported here)."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(amount(task.completed, task.total, str(task.fields.get("unit"))))

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(rate(task.finished_speed or task.speed, str(task.fields.get("unit"))))

    return [Amount(), Speed()]


def amount(done: float, total: float | None, unit: str) -> str:
    """Progress in one unit: "1.5 MiB/4.0 GiB", "120/8,887 files"."""
    if unit == "files":
        of = f"/{count(int(total))}" if total else ""
        return f"{count(int(done))}{of} files"
    return f"{size(done)}/{size(total)}" if total else size(done)


def rate(speed: float | None, unit: str) -> str:
    """A speed in the unit its amount uses: "12.5 MiB/s", "310 files/s"."""
    if speed is None:
        return ""
    return f"{speed:,.0f} files/s" if unit == "files" else f"{size(speed)}/s"


# -- values ---------------------------------------------------------------------------------


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(value: object) -> float:
    return float(value) if is_number(value) else 0.0


def count(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def size(value: object) -> str:
    if not is_number(value):
        return "-" if value is None else str(value)
    amount, units = number(value), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while abs(amount) >= 1024 and len(units) > 1:
        amount /= 1024
        units.pop(0)
    return f"{amount:.0f} B" if units[0] == "B" else f"{amount:.1f} {units[0]}"


def size_exact(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024:
        return f"{size(value)} ({value:,} bytes)"
    return size(value)


def seconds(value: object) -> str:
    if not is_number(value):
        return str(value)
    amount = number(value)
    return f"{amount:.3f} s" if amount < 10 else f"{amount:.1f} s"


def timings(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    known = [key for key in ("resolve", "hash", "fetch", "upload", "materialize") if key in value]
    others = [key for key in value if key not in known and key != "total"]
    order = known + others + (["total"] if "total" in value else [])
    return ", ".join(f"{key} {seconds(value[key])}" for key in order)


def sources(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    return ", ".join(f"{key} {size(amount)}" for key, amount in value.items())


def duration(value: object) -> str:
    if not is_number(value):
        return "-" if value is None else str(value)
    left = int(number(value))
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, left = divmod(left, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {left:02d}s"
    return f"{minutes}m {left:02d}s" if minutes else f"{left}s"


def when(value: object) -> str:
    if is_number(value):  # seconds since the epoch
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(number(value)))
    return "never" if value is None else str(value)


def ago(value: object, now: float) -> str:
    """Seconds since the epoch as an age: "just now", "5m ago", "3h ago", "12d ago"."""
    if not is_number(value):
        return "never" if value is None else str(value)
    left = max(0, int(now - number(value)))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= length and (unit != "s" or left >= 10):
            return f"{left // length}{unit} ago"
    return "just now"


SHORT_ID = 12  # hex digits of an id that `ls` shows, as git and docker do


def short_id(value: object) -> str:
    return "-" if value is None else str(value)[:SHORT_ID]


def tier_names(value: object) -> str:
    """The tiers that hold any of a snapshot's bytes, from {tier: bytes}: "mem, disk"."""
    if not isinstance(value, dict):
        return "-"
    return ", ".join(str(name) for name, amount in value.items() if number(amount) > 0) or "-"


MIN_ROOM = 12  # a column squeezed by `room` keeps at least this many cells


def room(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, column: int, total: int, gap: int
) -> int:
    """The cells left for `column` when the table's other columns take their widest cell and
    the table must fit `total` cells (MIN_ROOM at least, so a crowded table still shows it)."""
    others = sum(
        max(width(row[i]) for row in (headers, *rows)) for i in range(len(headers)) if i != column
    )
    return max(MIN_ROOM, total - others - gap * (len(headers) - 1))


def fit_list(items: Sequence[str], limit: int) -> str:
    """Items joined by ", " in at most `limit` cells: those that fit, then "+N" for the rest;
    a first item too long for the room is cut with "..."."""
    for shown in range(len(items), 0, -1):
        rest = len(items) - shown
        text = ", ".join(items[:shown]) + (f" +{rest}" if rest else "")
        if width(text) <= limit:
            return text
    if not items:
        return ""
    more = f" +{len(items) - 1}" if len(items) > 1 else ""
    return shorten(items[0], limit - len(more)) + more


def shorten(text: str, limit: int) -> str:
    """`text` in at most `limit` cells, its end replaced by "..." when cut."""
    if width(text) <= limit:
        return text
    keep = text
    while keep and width(keep) + 3 > limit:
        keep = keep[:-1]
    return keep + "..." if limit >= 3 else text[: max(limit, 0)]
