"""Starts the Python test upstream (tests/python/upstream.py) for the C
tests: prints "PORT CA_PEM" on one line, serves until stdin closes."""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from upstream import Upstream, make_ca  # noqa: E402

with tempfile.TemporaryDirectory() as d:
    ca, cert, key = make_ca(d)
    server = Upstream(cert, key)
    print(server.port, ca, flush=True)
    sys.stdin.read()
    server.close()
