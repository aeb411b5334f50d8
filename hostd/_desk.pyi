"""Types of the compiled desk (native/desk.c), the twin of hostd/desk.py's Desk."""

HAND_OVER: int
RENDER: int
FAILED: int
PAUSED: int
MAX_HEADERS: int

class Desk:
    def __init__(
        self,
        listener_fd: int,
        started: float,
        euid: int,
        hand_over_after: float,
        stale_after: float,
        fresh_wait: float,
        accept_pause: float,
        max_head: int,
        max_answer: int,
        /,
    ) -> None: ...
    @property
    def notify_fd(self) -> int: ...
    @property
    def answered(self) -> int: ...
    @property
    def handed(self) -> int: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def post(self, doc: bytes, at: float, /) -> None: ...
    def set_access(
        self,
        restore: tuple[bool, tuple[int, ...], tuple[int, ...]],
        publish: tuple[bool, tuple[int, ...], tuple[int, ...]],
        admin: tuple[bool, tuple[int, ...], tuple[int, ...]],
        /,
    ) -> None: ...
    def take(self) -> list[tuple[int, int, bool]]: ...
    def asked_at(self) -> float: ...

def status_request(head: bytes, /) -> bool | None: ...
