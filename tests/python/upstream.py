"""Local upstream servers for proxy tests: HTTPS with a test CA made by the
openssl command, on loopback. They record what they receive."""

import json
import os
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAMES = ["api.github.com", "github.com", "other.test"]


def make_ca(directory, names=None):
    """Creates a test CA and a leaf for `names` (default NAMES); returns
    (ca_pem, cert, key)."""
    names = names or NAMES
    d = str(directory)
    ca_key, ca_pem = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    key, csr, cert = (os.path.join(d, n) for n in ("leaf.key", "leaf.csr", "leaf.pem"))
    ext = os.path.join(d, "ext.cnf")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", ca_key, "-out", ca_pem, "-days", "2", "-subj", "/CN=upstream test ca")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=api.github.com")
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join("DNS:" + n for n in names) + "\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key,
        "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
    return ca_pem, cert, key


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = None  # set per server

    def log_message(self, *args):
        pass

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "authorization": self.headers.get_all("Authorization") or [],
            "x-api-key": self.headers.get_all("x-api-key") or [],
            "body": body.decode("utf-8", "replace"),
        }
        self.server.seen.append(record)
        if self.path == "/user" and self.server.users is not None:
            # A stand-in for GitHub's GET /user: known tokens get a login.
            auth = (record["authorization"] or [""])[0]
            login = self.server.users.get(auth.removeprefix("Bearer "))
            out = json.dumps({"login": login} if login else {"message": "Bad credentials"}).encode()
            self.send_response(200 if login else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "https://other.test/after-redirect")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        out = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _handle


class Upstream:
    """An HTTPS server on 127.0.0.1 that records requests."""

    def __init__(self, cert, key):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        self.server.seen = []
        self.server.users = None  # token -> login, to act as GitHub's /user
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self):
        return self.server.seen

    @property
    def users(self):
        return self.server.users

    @users.setter
    def users(self, users):
        self.server.users = users

    def resolve(self):
        """The proxy's resolve map: every test name to this server."""
        return {f"{n}:443": f"127.0.0.1:{self.port}" for n in NAMES}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
