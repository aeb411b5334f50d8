"""hostd: the snapshot daemon of a GPU host.

It keeps a tiered local cache of content-addressed, chunked snapshots, fetches what it misses
from object storage, and restores snapshots for local clients over a Unix socket.
"""

__version__ = "0.1.0"
