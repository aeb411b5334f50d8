"""A real S3 API server for tests: moto's server mode on a loopback port.

`MotoS3` runs one `moto.server.ThreadedMotoServer` (a real HTTP server in a thread of this
process) and hands out `S3Bucket`s: a fresh bucket with the endpoint, keys and region a
client needs, both as obstore origin_options and as AWS_* environment variables.

Must not touch the real AWS or the cloud metadata address: every bucket carries keys and a
loopback endpoint. moto accepts any keys unless auth is switched on (`MotoS3.enforce_auth`),
and that switch is process-wide, so it is always restored.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import obstore
from moto.server import ThreadedMotoServer
from obstore.store import S3Store

REGION = "us-east-1"
ACCESS_KEY_ID = "testing-key-id"
SECRET_ACCESS_KEY = "testing-secret"


@dataclass(frozen=True)
class S3Bucket:
    """One bucket on the test server, and how to reach it."""

    endpoint: str
    bucket: str
    region: str = REGION
    access_key_id: str = ACCESS_KEY_ID
    secret_access_key: str = SECRET_ACCESS_KEY
    # origin_options as a config file would give them (obstore's S3 config key names).
    options: dict[str, str] = field(init=False)
    # The same, as the AWS_* variables obstore (and boto3) read from the environment.
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        options = {
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "allow_http": "true",
        }
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_ALLOW_HTTP": "true",
        }
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "env", env)

    def url(self, prefix: str = "") -> str:
        """The origin URL for this bucket, under `prefix` (no leading or trailing '/')."""
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def keys(self) -> set[str]:
        """Every object key in the bucket, asked of the server directly (blocking)."""
        status, body = _call(self.endpoint, "GET", f"/{self.bucket}?list-type=2&max-keys=1000")
        if status != 200:
            raise RuntimeError(f"listing bucket {self.bucket} failed: {status} {body!r}")
        return set(re.findall(r"<Key>([^<]*)</Key>", body.decode()))

    def put_raw(self, key: str, data: bytes) -> None:
        """Store `data` at `key` behind the back of the code under test (blocking)."""
        status, body = _call(self.endpoint, "PUT", f"/{self.bucket}/{quote(key)}", data)
        if status != 200:
            raise RuntimeError(f"writing {key} failed: {status} {body!r}")

    def overwrite(self, key: str, data: bytes) -> None:
        """`put_raw` over an object that exists: signed, as the server takes no unsigned
        overwrite (blocking)."""
        store = S3Store(
            self.bucket,
            endpoint=self.endpoint,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            client_options={"allow_http": True},
        )
        obstore.put(store, key, data)


class MotoS3:
    """A moto S3 server on 127.0.0.1 and a free port, for the length of a `with` block."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._names = itertools.count()
        self.endpoint = ""
        self.host = ""
        self.port = 0

    def __enter__(self) -> MotoS3:
        # werkzeug logs every request at INFO to stderr; only its warnings are of use here.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{self.host}:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def __repr__(self) -> str:
        return f"<MotoS3 {self.endpoint or 'not started'}>"

    def new_bucket(self, name: str | None = None) -> S3Bucket:
        """Create a bucket (a fresh name unless given) and describe it."""
        bucket = name or f"hostd-test-{next(self._names)}"
        status, body = _call(self.endpoint, "PUT", f"/{bucket}")
        if status != 200:
            raise RuntimeError(f"moto refused to create bucket {bucket}: {status} {body!r}")
        return S3Bucket(endpoint=self.endpoint, bucket=bucket)

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """Make moto check keys against its (empty) IAM, so every key is rejected (403)."""
        status, body = _call(self.endpoint, "POST", "/moto-api/reset-auth", b"0")
        if status != 200:
            raise RuntimeError(f"moto refused to enforce auth: {status} {body!r}")
        previous = json.loads(body)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        try:
            yield
        finally:
            _call(self.endpoint, "POST", "/moto-api/reset-auth", str(previous).encode())


def _call(endpoint: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    # Plain http.client, unsigned: moto's default (no auth) accepts it, and the test helper
    # stays free of boto3. text/plain keeps Flask from eating a POST body as a form.
    parts = urlsplit(endpoint)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "text/plain"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
