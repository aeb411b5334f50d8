"""Proof of the cluster secret on peer requests: an HMAC over the request, with bounded skew.

A request carries `Authorization: hostd-hmac t=<unix seconds>,node=<sender node id>,
sig=<hex>`, where sig is HMAC-SHA256(secret, "hostd-peer-v1\\n" METHOD "\\n" PATH?QUERY "\\n" t
"\\n" node "\\n" name "\\n" hex(SHA-256(body))), name being the sender's X-Hostd-Name ("" if
none). A receiver accepts it only if the MAC matches and `t` is
within `MAX_SKEW` seconds of its own clock. This proves the sender holds the secret; it does
not hide the bytes (the chunks are verified by their ids anyway) and a captured request can be
replayed within the skew window, to read the same chunk again and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import re

SCHEME = "hostd-hmac"
MAX_SKEW = 60.0  # seconds either way
MIN_SECRET = 16  # bytes

_HEADER_RE = re.compile(
    r"hostd-hmac t=([0-9]{1,12}),node=([A-Za-z0-9_.-]{1,64}),sig=([0-9a-f]{64})"
)


class AuthError(Exception):
    """Why a request's proof was refused: the text goes back in the 401 answer."""


def _message(method: str, target: str, t: int, node: str, body: bytes, name: str) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"hostd-peer-v1\n{method}\n{target}\n{t}\n{node}\n{name}\n{digest}".encode()


def sign(
    secret: bytes, method: str, target: str, t: int, node: str, body: bytes = b"", name: str = ""
) -> str:
    """The Authorization header value for a request to `target` (path and query), from the
    member `name` (its X-Hostd-Name, signed too: the server acts on it)."""
    msg = _message(method, target, t, node, body, name)
    sig = hmac.new(secret, msg, hashlib.sha256).hexdigest()
    return f"{SCHEME} t={t},node={node},sig={sig}"


def parse(header: str) -> tuple[int, str, str]:
    """(t, node, sig) from a header value, or AuthError naming what is wrong with it."""
    m = _HEADER_RE.fullmatch(header)
    if m is None:
        raise AuthError(f"Authorization is not '{SCHEME} t=...,node=...,sig=...'")
    return int(m.group(1)), m.group(2), m.group(3)


def check_time(t: int, now: float, skew: float = MAX_SKEW) -> None:
    if abs(now - t) > skew:
        raise AuthError(
            f"request time {t} is {now - t:+.0f} s from this host's clock (at most {skew:.0f} s "
            "either way): check the clocks"
        )


def verify(
    secret: bytes,
    header: str,
    method: str,
    target: str,
    now: float,
    body: bytes = b"",
    skew: float = MAX_SKEW,
    name: str = "",
) -> str:
    """Check a request's proof; return the sender's node id, or raise AuthError."""
    t, node, sig = parse(header)
    check_time(t, now, skew)
    msg = _message(method, target, t, node, body, name)
    want = hmac.new(secret, msg, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        raise AuthError("signature does not match: the hosts do not share the same secret")
    return node


def load_secret(data: bytes, where: str) -> bytes:
    """The secret from a key file's bytes (surrounding white space dropped)."""
    secret = data.strip()
    if len(secret) < MIN_SECRET:
        raise AuthError(f"{where} holds {len(secret)} bytes; a cluster secret needs {MIN_SECRET}+")
    return secret
