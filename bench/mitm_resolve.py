"""mitmproxy addon for the moat benchmark: name resolution like moat's
--resolve. Every *.bench.test name connects to 127.0.0.1 (same port); any
other destination is refused, so mitmproxy never looks up a name or leaves
loopback.

The mapping is done where mitmproxy opens its server connections
(asyncio.open_connection), not by rewriting the server address in a hook:
mitmproxy reuses a server connection only for a request whose host matches
the connection's address, so a rewritten address would cost a new upstream
connection per request (and block at mitmproxy's per-address limit).
"""

import asyncio
import logging

SUFFIX = ".bench.test"
LOOPBACK = ("127.0.0.1", "::1", "localhost")

_open_connection = asyncio.open_connection


def _allowed(host):
    return isinstance(host, str) and (host.lower().endswith(SUFFIX) or host in LOOPBACK)


async def _bench_open_connection(host=None, port=None, *args, **kwargs):
    if isinstance(host, str) and host.lower().endswith(SUFFIX):
        host = "127.0.0.1"
    elif host not in LOOPBACK:
        raise OSError(f"moat-bench: refusing to connect to {host}:{port}")
    return await _open_connection(host, port, *args, **kwargs)


asyncio.open_connection = _bench_open_connection


class BenchResolve:
    def server_connect(self, data):
        address = data.server.address
        if not address or not _allowed(address[0]):
            logging.warning("moat-bench: refusing %s", address)
            data.server.error = "moat-bench: only *.bench.test is allowed"


addons = [BenchResolve()]
