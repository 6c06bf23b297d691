"""git clone over HTTPS through moat.Proxy, with real git on both ends.

The upstream is a local HTTPS server on 127.0.0.1 that runs `git
http-backend` as CGI (git's smart HTTP protocol) and, like GitHub, accepts a
token only as `Authorization: Basic base64("x-access-token:<token>")`. The
client is the git command, configured only by the environment moat gives a
child process. Every host name used is mapped to the local server through the
proxy's resolve option; nothing leaves loopback."""

import base64
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import moat
from upstream import make_ca

TOKEN = "ghp_GITsecretTOKEN0123456789abcdefXYZ"
BASIC = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
FILE_TEXT = "hello through moat\n"
CLONE_TIMEOUT = 60


def require_tools():
    missing = [t for t in ("git", "openssl") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"these tests need {' and '.join(missing)} on PATH "
                    f"(real git clones through the proxy; openssl makes the test CA)",
                    pytrace=False)


def clean_env(home):
    """os.environ without anything that could steer git (GIT_DIR, askpass
    helpers, user config) and with HOME in the test's directory."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GIT_") and k not in ("SSH_ASKPASS", "XDG_CONFIG_HOME")}
    os.makedirs(home, exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=os.path.join(home, ".config"),
               GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")
    return env


def git(*args, env, cwd=None):
    out = subprocess.run(["git", *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=CLONE_TIMEOUT)
    assert out.returncode == 0, f"git {' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


def make_repo(root, home):
    """A bare repository root/org/repo.git with one commit holding README.txt."""
    env = clean_env(home)
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    bare = os.path.join(root, "org", "repo.git")
    work = os.path.join(root, "..", "work")
    git("init", "-q", "--bare", "-b", "main", bare, env=env)
    git("init", "-q", "-b", "main", work, env=env)
    with open(os.path.join(work, "README.txt"), "w") as f:
        f.write(FILE_TEXT)
    git("add", "README.txt", env=env, cwd=work)
    git("commit", "-q", "-m", "first", env=env, cwd=work)
    git("push", "-q", bare, "main", env=env, cwd=work)
    return git("rev-parse", "HEAD", env=env, cwd=work).strip()


class GitHandler(BaseHTTPRequestHandler):
    """Smart HTTP via `git http-backend` as CGI, behind a GitHub-like token
    check. Records every request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body_chunks(self):
        """Yields the request body as it arrives (Content-Length or chunked)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 65536))
                    if not data:
                        raise ConnectionError("request body ended early")
                    left -= len(data)
                    yield data
                self.rfile.readline(3)  # CRLF after the chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    raise ConnectionError("request body ended early")
                left -= len(data)
                yield data

    def _send(self, status, headers, body=b""):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        server = self.server
        path, _, query = self.path.partition("?")
        auth = self.headers.get_all("Authorization") or []
        record = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "authorization": auth,
            "git-protocol": self.headers.get("Git-Protocol"),
            "transfer-encoding": self.headers.get("Transfer-Encoding"),
            "content-length": self.headers.get("Content-Length"),
            "status": None,
        }
        with server.lock:
            server.seen.append(record)
        try:
            self._serve(record, path, query, auth)
        finally:
            # Everything about the request is recorded: the client may have
            # had the whole response (and exited) some time before this.
            record["done"] = True

    def _serve(self, record, path, query, auth):
        server = self.server
        if auth != [server.expected_auth]:
            for _ in self._body_chunks():
                pass
            record["status"] = 401
            self._send(401, [("WWW-Authenticate", 'Basic realm="test"'),
                             ("Content-Type", "text/plain")], b"authentication required\n")
            return

        chunked = self.headers.get("Content-Length") is None
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": server.home,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_PROJECT_ROOT": server.project_root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(server.server_address[1]),
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": "x-access-token",
            "AUTH_TYPE": "Basic",
            "CONTENT_TYPE": self.headers.get("Content-Type") or "",
        }
        if self.command == "POST" and not chunked:
            env["CONTENT_LENGTH"] = self.headers["Content-Length"]
        for k, v in self.headers.items():
            if k.lower() in ("authorization", "content-type", "content-length"):
                continue
            env["HTTP_" + k.upper().replace("-", "_")] = v

        proc = subprocess.Popen(["git", "http-backend"], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errors = []
        record["body_bytes"] = 0

        def feed():  # stream the body in while the output is read below
            try:
                for data in self._body_chunks():
                    record["body_bytes"] += len(data)
                    proc.stdin.write(data)
            except Exception as e:  # noqa: BLE001 - reported through errors
                errors.append(e)
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        stderr = []
        drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
        drain.start()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()

        status, headers = 200, []
        while True:
            line = proc.stdout.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            value = value.strip()
            if name.lower() == "status":
                status = int(value.split()[0])
            else:
                headers.append((name, value))
        record["status"] = status
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            data = proc.stdout.read1(65536)
            if not data:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        feeder.join(CLONE_TIMEOUT)
        proc.wait(CLONE_TIMEOUT)
        drain.join(5)
        record["backend_rc"] = proc.returncode
        record["backend_stderr"] = b"".join(stderr).decode("utf-8", "replace")
        if errors:
            record["body_error"] = repr(errors[0])

    do_GET = do_POST = _handle


class GitServer:
    """An HTTPS git smart-HTTP server on 127.0.0.1 that wants the token."""

    def __init__(self, cert, key, project_root, home):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), GitHandler)
        self.server.daemon_threads = True
        self.server.seen = []
        self.server.lock = threading.Lock()
        self.server.expected_auth = BASIC
        self.server.project_root = str(project_root)
        self.server.home = str(home)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self):
        with self.server.lock:
            return list(self.server.seen)

    def resolve(self):
        return {f"{n}:443": f"127.0.0.1:{self.port}" for n in ("github.com", "other.test")}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gitserver(tmp_path):
    require_tools()
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = make_ca(certs)
    root = tmp_path / "srv" / "root"
    root.mkdir(parents=True)
    head = make_repo(str(root), str(tmp_path / "srv" / "home"))
    server = GitServer(cert, key, root, tmp_path / "srv" / "home")
    server.ca = ca
    server.head = head
    yield server
    server.close()


def github_cred():
    return moat.Credential(host="github.com", header="Authorization", value=BASIC,
                           grant="github")


def start(server, tmp_path, **kw):
    return moat.Proxy(upstream_ca=server.ca, resolve=server.resolve(),
                      home=tmp_path / "home", name="git-test", **kw)


def settled(proxy, server, timeout=30):
    """(trace, audit events, the server's records) once every request is
    finished on both ends: git can exit as soon as the last chunk of the
    last response reaches it, before the server has recorded the backend's
    exit status and the proxy its trace record."""
    deadline = time.time() + timeout
    while True:
        seen = server.seen
        trace = proxy.trace()
        requests = [r for r in trace if r["method"] != "CONNECT"]
        if all(r.get("done") for r in seen) and len(requests) >= len(seen):
            return trace, proxy.audit_events(), seen
        assert time.time() < deadline, \
            f"requests not finished within {timeout} s: server saw {seen}, trace {trace}"
        time.sleep(0.05)


def clone(proxy, tmp_path, url, dest):
    env = {**clean_env(str(tmp_path / "client-home")), **proxy.env()}
    started = time.monotonic()
    out = subprocess.run(["git", "clone", url, str(dest)], env=env, capture_output=True,
                         text=True, timeout=CLONE_TIMEOUT, stdin=subprocess.DEVNULL)
    return out, time.monotonic() - started


def test_git_clone_gets_the_injected_token(gitserver, tmp_path):
    dest = tmp_path / "clone"
    with start(gitserver, tmp_path, credentials=[github_cred()]) as proxy:
        out, _ = clone(proxy, tmp_path, "https://github.com/org/repo.git", dest)
        assert out.returncode == 0, f"git clone failed:\n{out.stderr}\nserver saw: {gitserver.seen}"
        trace, events, seen = settled(proxy, gitserver)
    assert (dest / "README.txt").read_text() == FILE_TEXT
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True,
                          text=True, env=clean_env(str(tmp_path / "client-home")))
    assert head.stdout.strip() == gitserver.head

    paths = [r["path"].partition("?")[0] for r in seen]
    assert "/org/repo.git/info/refs" in paths
    assert "/org/repo.git/git-upload-pack" in paths
    for r in seen:
        assert r["host"] == "github.com", r
        assert r["authorization"] == [BASIC], r  # the exact token, exactly once
        assert r["status"] == 200, r
        assert r.get("backend_rc") == 0, r
        assert "body_error" not in r, r

    requests = [r for r in trace if r["method"] != "CONNECT"]
    assert len(requests) == len(seen), (trace, seen)
    for r in requests:
        assert r["url"].startswith("https://github.com/org/repo.git/"), r
        assert r["status"] == 200, r
        assert r["grant"] == "github", r
        assert ["authorization", "[redacted]"] in r["request_headers"], r
    injected = [e for e in events if e["type"] == "credential_injected"]
    assert len(injected) == len(seen)
    assert all(e["grant"] == "github" and e["host"] == "github.com" for e in injected)
    for blob in (json.dumps(trace), json.dumps(events)):
        assert TOKEN not in blob
        assert BASIC.split()[1] not in blob  # nor its base64 form


def test_git_clone_without_the_credential_fails_fast(gitserver, tmp_path):
    dest = tmp_path / "clone"
    with start(gitserver, tmp_path) as proxy:
        out, elapsed = clone(proxy, tmp_path, "https://github.com/org/repo.git", dest)
        trace = proxy.trace()
    assert out.returncode != 0, out.stdout
    assert elapsed < 30, f"git took {elapsed:.1f}s to give up"
    assert "terminal prompts disabled" in out.stderr or "401" in out.stderr, out.stderr
    assert not (dest / "README.txt").exists()
    seen = gitserver.seen
    assert seen, "the request should have reached the server"
    for r in seen:
        assert r["authorization"] == [], r
        assert r["status"] == 401, r
    requests = [r for r in trace if r["method"] != "CONNECT"]
    assert requests and all(r["status"] == 401 and r["grant"] is None for r in requests), trace


def test_strict_policy_allows_the_credential_host_only(gitserver, tmp_path):
    with start(gitserver, tmp_path, credentials=[github_cred()], policy="strict") as proxy:
        ok, _ = clone(proxy, tmp_path, "https://github.com/org/repo.git", tmp_path / "a")
        refused, elapsed = clone(proxy, tmp_path, "https://other.test/org/repo.git",
                                 tmp_path / "b")
        trace = proxy.trace()
        events = proxy.audit_events()
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a" / "README.txt").read_text() == FILE_TEXT

    assert refused.returncode != 0
    assert elapsed < 30
    assert "403" in refused.stderr, refused.stderr
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    assert all(r["host"] == "github.com" for r in gitserver.seen), gitserver.seen
    assert any(r["host"] == "other.test" and r["status"] == 403 for r in trace), trace
    assert any(e["type"] == "policy_decision" and e["host"] == "other.test"
               and not e["allowed"] for e in events), events
    # The allowed tunnel is audited with the rule that allowed it.
    assert any(e["type"] == "policy_decision" and e["host"] == "github.com"
               and e["allowed"] and e["rule"] == "grant:github" for e in events), events
    for blob in (json.dumps(trace), json.dumps(events)):
        assert TOKEN not in blob


def test_git_push_streams_a_chunked_body(gitserver, tmp_path):
    """A push of a 3 MB blob: git sends the pack with no length (HTTP/2 to
    moat), moat streams it upstream chunked, with the token injected."""
    env_extra = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                 "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    blob = os.urandom(3_000_000)
    dest = tmp_path / "clone"
    with start(gitserver, tmp_path, credentials=[github_cred()]) as proxy:
        out, _ = clone(proxy, tmp_path, "https://github.com/org/repo.git", dest)
        assert out.returncode == 0, out.stderr
        env = {**clean_env(str(tmp_path / "client-home")), **proxy.env(), **env_extra}
        (dest / "big.bin").write_bytes(blob)
        git("add", "big.bin", env=env, cwd=dest)
        git("commit", "-q", "-m", "big", env=env, cwd=dest)
        pushed = git("rev-parse", "HEAD", env=env, cwd=dest).strip()
        git("push", "-q", "origin", "main", env=env, cwd=dest)
        trace, _, seen = settled(proxy, gitserver)
    bare = os.path.join(gitserver.server.project_root, "org", "repo.git")
    local = clean_env(str(tmp_path / "client-home"))
    assert git("--git-dir", bare, "rev-parse", "main", env=local).strip() == pushed
    stored = subprocess.run(["git", "--git-dir", bare, "cat-file", "blob", "main:big.bin"],
                            env=local, capture_output=True, timeout=CLONE_TIMEOUT).stdout
    assert stored == blob

    packs = [r for r in seen if r["path"] == "/org/repo.git/git-receive-pack"
             and (r.get("body_bytes") or 0) > len(blob) // 2]
    assert len(packs) == 1, seen
    assert packs[0]["transfer-encoding"] == "chunked", packs[0]
    for r in seen:
        assert r["authorization"] == [BASIC], r
        assert r["status"] == 200 and r.get("backend_rc") == 0, r
        assert "body_error" not in r, r
    requests = [r for r in trace if r["method"] != "CONNECT"]
    assert [r["request_bytes"] for r in requests] == [r.get("body_bytes", 0) for r in seen]
    assert all(r["grant"] == "github" and r["status"] == 200 for r in requests), requests
    assert TOKEN not in json.dumps(trace)
