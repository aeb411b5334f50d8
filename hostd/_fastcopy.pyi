"""Types of the compiled half of hostd/fastcopy.py (native/fastcopy.c)."""

from collections.abc import Sequence

def create_files(
    jobs: Sequence[tuple[int, str, int, int, int, int | None]], threads: int = 1, /
) -> tuple[int, int, int, int] | None: ...
def write_blobs(
    jobs: Sequence[tuple[str, str, bytes | bytearray | memoryview, int | None, int]],
    threads: int = 1,
    /,
) -> list[tuple[int, int, int] | tuple[int, int]]: ...
def stat_paths(paths: Sequence[str], /) -> list[tuple[int, int, int] | int]: ...
def link_files(jobs: Sequence[tuple[int, str, int, str]], /) -> list[int]: ...
