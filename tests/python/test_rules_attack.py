"""Attacks on request rules (network.rules) and git rules, from an agent's
side of moat.Proxy. Each test asserts the secure behaviour, so it fails when
the attack gets a denied request (or push) to the upstream.

Every name maps to a server this file starts on 127.0.0.1 (the proxy's
resolve option, as MOAT_RESOLVE); nothing leaves loopback. Requests are
written byte for byte through a CONNECT tunnel (or as plain absolute-form
HTTP to the proxy) so that no client library tidies the path first."""

import base64
import http.client
import json
import os
import posixpath
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import moat
from test_proxy_git import BASIC, GitHandler, clean_env, git, github_cred, make_repo, require_tools
from upstream import make_ca

NAMES = ["ruled.test", "open.test", "github.com"]
ZERO = "0" * 40


# --------------------------------------------------------------- upstreams

class Recorder(BaseHTTPRequestHandler):
    """Records every request as received (raw target, method, headers, body)
    and answers 200 with the record."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _handle(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
        record = {"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                  "headers": {k.lower(): v for k, v in self.headers.items()},
                  "body": body.decode("latin-1")}
        self.server.seen.append(record)
        out = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)


class Server:
    def __init__(self, handler, cert=None, key=None):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.seen = []
        if cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def seen(self):
        return list(self.server.seen)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("certs"), NAMES)


@pytest.fixture
def https_up(certs):
    ca, cert, key = certs
    s = Server(Recorder, cert, key)
    s.ca = ca
    yield s
    s.close()


@pytest.fixture
def plain_up():
    s = Server(Recorder)
    yield s
    s.close()


def proxy_for(tmp_path, ca, https_port=None, http_port=None, **kw):
    resolve = {}
    for n in NAMES:
        if https_port:
            resolve[f"{n}:443"] = f"127.0.0.1:{https_port}"
        if http_port:
            resolve[f"{n}:80"] = f"127.0.0.1:{http_port}"
    return moat.Proxy(upstream_ca=ca, resolve=resolve, home=tmp_path / "home",
                      name="attack", **kw)


# ------------------------------------------------------------ raw clients

def _auth(proxy):
    u = urllib.parse.urlsplit(proxy.url)
    return u, base64.b64encode(f"{u.username}:{u.password}".encode()).decode()


def tunnel(proxy, host, port=443, sni=None):
    """A TLS socket to `host` through the proxy's CONNECT (moat's CA)."""
    u, auth = _auth(proxy)
    s = socket.create_connection((u.hostname, u.port), timeout=20)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
              f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=proxy.ca_cert_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(s, server_hostname=sni or host)


class _OneFile:
    """Lets http.client read several responses from one buffered file."""

    class _Keep:
        def __init__(self, f):
            self.f = f

        def close(self):
            pass

        def __getattr__(self, name):
            return getattr(self.f, name)

    def __init__(self, f):
        self.f = self._Keep(f)

    def makefile(self, *a, **k):
        return self.f


def responses(sock, n=1, method="GET"):
    """Reads n responses: [(status, body)]."""
    f = sock.makefile("rb")
    out = []
    for _ in range(n):
        r = http.client.HTTPResponse(_OneFile(f), method=method)
        r.begin()
        out.append((r.status, r.read()))
    return out


def send(proxy, host, raw, n=1, method="GET", sni=None):
    """Sends raw HTTP/1.1 bytes inside a tunnel to host; the n responses."""
    with tunnel(proxy, host, sni=sni) as s:
        s.sendall(raw)
        return responses(s, n, method)


def req(method, target, host="ruled.test", headers=(), body=b""):
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def plain(proxy, raw):
    """Sends raw bytes to the proxy itself (absolute-form plain HTTP)."""
    u, auth = _auth(proxy)
    raw = raw.replace(b"\r\n\r\n", f"\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode(), 1)
    with socket.create_connection((u.hostname, u.port), timeout=20) as s:
        s.sendall(raw)
        return responses(s)[0]


# ====================================================== paths: what the
# proxy judges vs what the server routes on. The proxy matches a normalised
# path but forwards the raw one; a server that reads the raw path another
# (common) way reaches what the rules deny.

PATH_RULES = [{"ruled.test": [
    "deny * /org/*/admin/**",
    "allow GET /org/**",
    "allow POST /org/*/issues",
]}]


def server_view(path, model):
    """How a server reads a request path.
    raw:    routes on the raw path, no dot handling (Node/Express-style routers).
    nginx:  %-decodes, merges slashes, removes dot segments (';' is literal).
    rfc3986: removes dot segments per RFC 3986 5.2.4, keeps empty segments
            (WHATWG URL; nginx/Apache with merge_slashes/MergeSlashes off).
    double: %-decodes once more before reading it as nginx does (an app
            behind a decoding front server, or one that unquotes its own
            path again: the classic double-decoding bug)."""
    path = path.split("?")[0]
    if model == "raw":
        return path
    if model == "double":
        return server_view(urllib.parse.unquote(path), "nginx")
    if model == "nginx":
        p = re.sub("/+", "/", urllib.parse.unquote(path))
        out = posixpath.normpath(p)
        return out + ("/" if p.endswith("/") and out != "/" else "")
    if model == "rfc3986":
        out = []
        segs = path.split("/")[1:]
        for i, s in enumerate(segs):
            if s == "..":
                if out:
                    out.pop()
            elif s != ".":
                out.append(s)
        return "/" + "/".join(out)
    raise ValueError(model)


@pytest.mark.parametrize("path,model", [
    # `..;` is `..` only to Java servlet containers; the proxy resolves it
    # like Tomcat, nginx and most servers route on it literally.
    ("/org/repo/admin/..;/info", "nginx"),
    # An empty segment: the proxy drops it before `..`, so `..` removes
    # `admin`; RFC 3986 dot removal removes the empty segment instead.
    ("/org/repo/admin//../info", "rfc3986"),
    # Routers that match the raw path (no dot handling) see admin.
    ("/org/repo/admin/../info", "raw"),
    ("/org/repo/admin/%2e%2e/info", "raw"),
    ("/org/repo/admin/.%2E/info", "raw"),
    # Encoded twice: one decoding leaves `%2e%2e` (a plain segment), a
    # second makes it `..` or `admin`.
    ("/org/repo/x/%252e%252e/admin/info", "double"),
    ("/org/repo/x/%252E%252e/admin/info", "double"),
    ("/org/repo/%2561dmin/info", "double"),
    ("/org/repo/admin%252fx", "double"),
])
def test_a_denied_path_is_not_reached_through_a_spelling_the_server_reads_differently(
        https_up, tmp_path, path, model):
    with proxy_for(tmp_path, https_up.ca, https_up.port, policy="strict", rules=PATH_RULES) as p:
        [(status, _)] = send(p, "ruled.test", req("GET", path))
    reached = [server_view(r["path"], model) for r in https_up.seen]
    assert not any(v.startswith("/org/repo/admin") for v in reached), \
        f"{path}: proxy answered {status}; the server ({model}) routed it to {reached}"


@pytest.mark.parametrize("path", [
    "/org/repo/%c0%ae%c0%ae/repo/admin/x",   # overlong UTF-8 '.'
    "/org/repo/%C0%AE%C0%AE/repo/admin/x",
    "/org/repo/admin%5cx",
    "/org/repo/admin%00/x",
    "/org/repo/%2E%2e/repo/ADMIN/x",
    "/org/repo/x/%2e/%2e%2e/admin/x",
    "/org/repo/admin./x/..",                  # dot segments are refused, whatever the rest
    "/org/repo/admin./x",                     # `admin.` is another segment (allowed)
])
def test_encoded_spellings_of_admin_are_denied(https_up, tmp_path, path):
    with proxy_for(tmp_path, https_up.ca, https_up.port, policy="strict", rules=PATH_RULES) as p:
        [(status, body)] = send(p, "ruled.test", req("GET", path))
    if path == "/org/repo/admin./x":
        # `admin.` is not `admin` for the proxy nor for nginx: allowed, and
        # the server must see exactly that path.
        assert status == 200 and [r["path"] for r in https_up.seen] == [path]
        return
    assert status == 403, (path, body)
    assert https_up.seen == []


# ========================================================== methods

METHOD_RULES = [{"ruled.test": [
    "deny DELETE /**",
    "deny GET /org/*/admin/**",
    "allow * /**",
]}]


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_a_method_override_header_does_not_turn_an_allowed_post_into_a_denied_delete(
        https_up, tmp_path, header):
    """Many frameworks (Google APIs, Rack/Express/ASP.NET middlewares)
    execute the method the override header names."""
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=METHOD_RULES) as p:
        [(status, _)] = send(p, "ruled.test", req("POST", "/org/repo", headers=[(header, "DELETE")]))
    smuggled = [r for r in https_up.seen if r["headers"].get(header.lower(), "").upper() == "DELETE"]
    assert smuggled == [], f"{header}: DELETE reached the server as POST ({status})"


@pytest.mark.parametrize("override", [
    ("X-HTTP-Method-Override", "DELETE, GET"),
    ("X-HTTP-Method", "DELETE,x"),
    ("X-Method-Override", "GET DELETE"),
    ("X-HTTP-Method-Override", "get,\tdelete"),
    (None, "/org/repo?_method=DELETE"),
    (None, "/org/repo?a=1&%5Fmethod=dele%74e"),
])
def test_a_method_override_that_names_several_methods_is_judged_under_each(
        https_up, tmp_path, override):
    """Express's method-override takes the first name of `DELETE, GET`
    (and reads `?_method=`), another framework the last: the proxy judges
    the request under every name it carries, so no list hides a DELETE."""
    header, value = override
    if header:
        raw = req("POST", "/org/repo", headers=[(header, value)])
    else:
        raw = req("POST", value)
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=METHOD_RULES) as p:
        [(status, body)] = send(p, "ruled.test", raw)
    assert status == 403 and b"DELETE /**" in body, (override, status, body)
    assert https_up.seen == [], f"{override}: the request reached the server"


def test_an_override_naming_only_allowed_methods_still_goes(https_up, tmp_path):
    """The control: a list of allowed methods is not refused for being a list."""
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=METHOD_RULES) as p:
        [(status, _)] = send(p, "ruled.test", req(
            "POST", "/org/repo?_method=PUT", headers=[("X-HTTP-Method-Override", "PATCH, PUT")]))
    assert status == 200
    assert [r["path"] for r in https_up.seen] == ["/org/repo?_method=PUT"]


SECRET = "Bearer moat-trace-secret-0123456789"


@pytest.mark.parametrize("raw", [
    req("TRACE", "/"),
    req("trace", "/x"),
    req("TRACK", "/"),
    req("POST", "/", headers=[("X-HTTP-Method-Override", "TRACE")]),
    req("POST", "/?_method=trace"),
])
def test_trace_never_carries_a_credential_a_server_would_echo(https_up, tmp_path, raw):
    """A server answers TRACE (Apache's default) with the request as it
    arrived: with the credential injected, the agent would read its token
    in the body. The proxy refuses it before any credential is added."""
    cred = moat.Credential(host="ruled.test", header="Authorization", value=SECRET, grant="t")
    with proxy_for(tmp_path, https_up.ca, https_up.port, credentials=[cred]) as p:
        [(status, body)] = send(p, "ruled.test", raw)
        trace = p.trace()
    assert status == 405, (raw, status, body)
    assert b"not sent to ruled.test with a credential" in body, body
    assert SECRET.encode() not in body
    assert https_up.seen == []
    assert [r["status"] for r in trace] == [405]


def test_trace_without_a_credential_goes_as_any_method(https_up, tmp_path):
    """The control: TRACE to a host the proxy adds nothing to is sent."""
    cred = moat.Credential(host="ruled.test", header="Authorization", value=SECRET, grant="t")
    with proxy_for(tmp_path, https_up.ca, https_up.port, credentials=[cred]) as p:
        [(status, _)] = send(p, "open.test", req("TRACE", "/", host="open.test"))
    assert status == 200
    assert [(r["method"], "authorization" in r["headers"]) for r in https_up.seen] == [("TRACE", False)]


def test_lower_case_and_odd_methods_are_judged(https_up, tmp_path):
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=METHOD_RULES) as p:
        for m in ("delete", "DeLeTe"):
            [(status, _)] = send(p, "ruled.test", req(m, "/org/repo"))
            assert status == 403, m
    assert https_up.seen == []


def test_head_is_not_a_way_around_a_get_deny(https_up, tmp_path):
    """Most servers run the GET handler for HEAD (Go's ServeMux, Express,
    Flask, Rails): `deny GET` that lets HEAD through runs the denied
    handler and leaks its headers."""
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=METHOD_RULES) as p:
        [(status, _)] = send(p, "ruled.test", req("HEAD", "/org/repo/admin/x"), method="HEAD")
    assert [r for r in https_up.seen if "/admin" in r["path"]] == [], \
        f"HEAD on a GET-denied path reached the server ({status})"


def test_an_allow_lets_through_only_the_case_it_names_and_a_deny_catches_every_case(
        https_up, tmp_path):
    """A case-sensitive server reads /PUBLIC/x as another path than
    /public/x: `allow GET /public/**` must not let it through, while
    `deny * /secret/**` refuses /SECRET/x (a server that ignores case would
    serve the secret)."""
    rules = [{"ruled.test": ["deny * /secret/**", "allow GET /public/**"]}]
    with proxy_for(tmp_path, https_up.ca, https_up.port, policy="strict", rules=rules) as p:
        results = {path: send(p, "ruled.test", req("GET", path))[0][0]
                   for path in ("/public/x", "/PUBLIC/x", "/Public/x", "/SECRET/x", "/secret/x")}
    assert results == {"/public/x": 200, "/PUBLIC/x": 403, "/Public/x": 403,
                       "/SECRET/x": 403, "/secret/x": 403}, results
    assert [r["path"] for r in https_up.seen] == ["/public/x"]


# ========================================================== hosts

def test_plain_http_host_header_must_name_the_judged_host(plain_up, certs, tmp_path):
    """Plain HTTP: the rules are chosen by the absolute URL's host, but the
    client's own Host header is forwarded. On a shared address (a CDN,
    virtual hosts) the server serves the Host header's site."""
    ca, _, _ = certs
    rules = [{"ruled.test": ["deny * /admin/**", "allow * /**"]}]
    with proxy_for(tmp_path, ca, http_port=plain_up.port, rules=rules) as p:
        status, body = plain(p, req("GET", "http://ruled.test/admin/x"))
        assert status == 403, body
        status, body = plain(p, req("GET", "http://open.test/admin/x", host="ruled.test"))
    reached = [(r["host"], r["path"]) for r in plain_up.seen]
    assert ("ruled.test", "/admin/x") not in reached, \
        f"a denied request for ruled.test reached its server ({status}): {reached}"


def test_tunnel_host_header_must_name_the_tunnel_host(https_up, tmp_path):
    rules = [{"ruled.test": ["deny * /admin/**", "allow * /**"]}]
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=rules) as p:
        [(status, _)] = send(p, "open.test", req("GET", "/admin/x", host="ruled.test"))
        assert status == 421
        [(status, _)] = send(p, "open.test", req("GET", "https://ruled.test/admin/x", host="open.test"))
        assert status == 421
        [(status, _)] = send(p, "RULED.test.", req("GET", "/admin/x", host="RULED.TEST."),
                             sni="ruled.test")
        assert status == 403
    assert https_up.seen == []


def test_non_path_targets_in_a_tunnel_are_refused(https_up, tmp_path):
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=PATH_RULES) as p:
        for raw in (req("OPTIONS", "*"), req("CONNECT", "ruled.test:443")):
            [(status, _)] = send(p, "ruled.test", raw)
            assert status == 400, raw
    assert https_up.seen == []


# ========================================================== smuggling

def test_te_and_cl_together_do_not_smuggle_a_second_request(https_up, tmp_path):
    hidden = b"GET /org/repo/admin/x HTTP/1.1\r\nHost: ruled.test\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    raw = (b"POST /org/repo/issues HTTP/1.1\r\nHost: ruled.test\r\n"
           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)) + body
    with proxy_for(tmp_path, https_up.ca, https_up.port, policy="strict", rules=PATH_RULES) as p:
        with tunnel(p, "ruled.test") as s:
            s.sendall(raw)
            try:
                responses(s, 2)
            except (http.client.HTTPException, OSError):
                pass
    assert [r for r in https_up.seen if "admin" in r["path"]] == []


def test_pipelined_requests_are_each_judged(https_up, tmp_path):
    raw = req("GET", "/org/repo/info") + req("GET", "/org/repo/admin/x") + req("GET", "/org/repo/y")
    with proxy_for(tmp_path, https_up.ca, https_up.port, policy="strict", rules=PATH_RULES) as p:
        got = send(p, "ruled.test", raw, n=3)
    assert [s for s, _ in got] == [200, 403, 200]
    assert [r["path"] for r in https_up.seen] == ["/org/repo/info", "/org/repo/y"]


# ========================================================== git pushes

GIT_RULES = [{"github.com": [
    "allow GET /**",
    "allow POST /*/*/git-upload-pack",
    "allow git-push refs/heads/agent/**",
    "allow git-delete refs/heads/agent/tmp/**",
    "deny git-push **",
]}]


class NormalisingGitHandler(GitHandler):
    """git http-backend behind a front end that, like Apache or nginx,
    %-decodes the path and resolves dot segments before PATH_INFO."""

    def _handle(self):
        raw = self.path
        path, _, query = raw.partition("?")
        path = server_view(path, "nginx")
        record = {"method": self.command, "path": raw, "host": self.headers.get("Host"),
                  "status": None}
        with self.server.lock:
            self.server.seen.append(record)
        try:
            self._serve(record, path, query, self.headers.get_all("Authorization") or [])
        finally:
            record["done"] = True

    do_GET = do_POST = _handle


@pytest.fixture(scope="module")
def gitsrv_module(tmp_path_factory, certs):
    require_tools()
    ca, cert, key = certs
    tmp_path = tmp_path_factory.mktemp("git")
    root = tmp_path / "srv" / "root"
    root.mkdir(parents=True)
    home = tmp_path / "srv" / "home"
    head = make_repo(str(root), str(home))
    s = Server(NormalisingGitHandler, cert, key)
    s.server.lock = threading.Lock()
    s.server.expected_auth = BASIC
    s.server.project_root = str(root)
    s.server.home = str(home)
    s.ca, s.head, s.bare, s.home = ca, head, os.path.join(root, "org", "repo.git"), str(home)
    yield s
    s.close()


@pytest.fixture
def gitsrv(gitsrv_module):
    """The repository as made: main and release (a branch the agent may not
    delete or move) at the first commit, nothing else."""
    s = gitsrv_module
    env = clean_env(s.home)
    for name in git("--git-dir", s.bare, "for-each-ref", "--format=%(refname)", env=env).split():
        if name not in ("refs/heads/main", "refs/heads/release"):
            git("--git-dir", s.bare, "update-ref", "-d", name, env=env)
    git("--git-dir", s.bare, "update-ref", "refs/heads/main", s.head, env=env)
    git("--git-dir", s.bare, "update-ref", "refs/heads/release", s.head, env=env)
    with s.server.lock:
        s.server.seen.clear()
    return s


def ref(server, name):
    out = subprocess.run(["git", "--git-dir", server.bare, "rev-parse", "--verify", "-q", name],
                         env=clean_env(server.home), capture_output=True, text=True)
    return out.stdout.strip() or None


def pkt(s):
    data = s.encode() if isinstance(s, str) else s
    return b"%04x" % (len(data) + 4) + data


def push_request(target, lines, chunks=None, extra=()):
    """A receive-pack POST carrying `lines` (ref updates) and a flush: only
    deletions, so no pack follows."""
    body = b"".join(pkt(line) for line in lines) + b"0000"
    head = [f"POST {target} HTTP/1.1", "Host: github.com",
            "Content-Type: application/x-git-receive-pack-request",
            "Accept: application/x-git-receive-pack-result", *extra]
    if chunks:
        head.append("Transfer-Encoding: chunked")
        out = ("\r\n".join(head) + "\r\n\r\n").encode()
        for i in range(0, len(body), chunks):
            part = body[i:i + chunks]
            out += b"%x\r\n%s\r\n" % (len(part), part)
        return out + b"0\r\n\r\n"
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def delete_release(server):
    return f"{server.head} {ZERO} refs/heads/release\0report-status delete-refs agent=git/2\n"


@pytest.mark.parametrize("policy,extra_rule", [("permissive", None),
                                               ("strict", "allow POST /org/repo.git/git-receive-pack")])
@pytest.mark.parametrize("target", [
    "/org/repo.git/git-receive-p%61ck",
    "/org/repo.git/git-receive-pack/.",
    "/org/repo.git/git-receive-pack/x/..",
])
def test_a_push_by_another_spelling_of_git_receive_pack_is_still_judged_by_ref(
        gitsrv, tmp_path, policy, extra_rule, target):
    """The proxy recognises a push by the raw path ending in
    /git-receive-pack; the same path spelled another way (which its own
    normalisation, and Apache/nginx in front of git http-backend, read as
    /git-receive-pack) is judged as an ordinary POST."""
    rules = [{"github.com": ([extra_rule] if extra_rule else []) + GIT_RULES[0]["github.com"]}]
    with proxy_for(tmp_path, gitsrv.ca, gitsrv.port, policy=policy, rules=rules,
                   credentials=[github_cred()]) as p:
        [(status, body)] = send(p, "github.com", push_request(target, [delete_release(gitsrv)]))
    assert ref(gitsrv, "refs/heads/release") == gitsrv.head, \
        f"{policy} {target}: a delete no git-delete rule allows was accepted ({status} {body!r})"


def test_the_normal_spelling_is_refused_even_split_in_one_byte_chunks(gitsrv, tmp_path):
    """Held: an allowed update first, capabilities and push-options on the
    first line, the denied deletion last, the body in 1-byte chunks."""
    z = ZERO
    lines = [f"{z} {gitsrv.head} refs/heads/agent/x\0report-status push-options delete-refs\n",
             f"{z} {gitsrv.head} refs/heads/agent/y\n",
             f"{gitsrv.head} {z} refs/heads/release\n"]
    with proxy_for(tmp_path, gitsrv.ca, gitsrv.port, rules=GIT_RULES,
                   credentials=[github_cred()]) as p:
        [(status, body)] = send(p, "github.com",
                                push_request("/org/repo.git/git-receive-pack", lines, chunks=1))
    assert b"ng refs/heads/release" in body, body
    assert ref(gitsrv, "refs/heads/release") == gitsrv.head
    assert [r for r in gitsrv.seen if r["method"] == "POST"] == []


@pytest.mark.parametrize("encoding", [["gzip"], ["identity", "gzip"], ["x-gzip"]])
def test_compressed_pushes_are_refused(gitsrv, tmp_path, encoding):
    import gzip
    body = gzip.compress(pkt(delete_release(gitsrv)) + b"0000")
    raw = ("POST /org/repo.git/git-receive-pack HTTP/1.1\r\nHost: github.com\r\n"
           "Content-Type: application/x-git-receive-pack-request\r\n"
           + "".join(f"Content-Encoding: {e}\r\n" for e in encoding)
           + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with proxy_for(tmp_path, gitsrv.ca, gitsrv.port, rules=GIT_RULES,
                   credentials=[github_cred()]) as p:
        [(status, _)] = send(p, "github.com", raw)
    assert status == 403
    assert ref(gitsrv, "refs/heads/release") == gitsrv.head


def test_a_websocket_upgrade_header_does_not_skip_the_ref_check(gitsrv, tmp_path):
    """A push that also asks to upgrade to WebSocket takes the proxy's
    upgrade path, which forwards the body unread. git http-backend ignores
    the upgrade and applies the push. Real git can send it
    (http.extraHeader)."""
    with proxy_for(tmp_path, gitsrv.ca, gitsrv.port, policy="strict", rules=GIT_RULES,
                   credentials=[github_cred()]) as p:
        raw = push_request("/org/repo.git/git-receive-pack", [delete_release(gitsrv)],
                           extra=["Connection: Upgrade", "Upgrade: websocket"])
        [(status, body)] = send(p, "github.com", raw)
        assert ref(gitsrv, "refs/heads/release") == gitsrv.head, \
            f"the denied delete was applied ({status} {body!r})"


def test_real_git_push_to_main_with_upgrade_headers_is_refused(gitsrv, tmp_path):
    with proxy_for(tmp_path, gitsrv.ca, gitsrv.port, policy="strict", rules=GIT_RULES,
                   credentials=[github_cred()]) as p:
        env = {**clean_env(str(tmp_path / "client")), **p.env(),
               "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x.invalid",
               "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x.invalid"}
        dest = tmp_path / "clone"
        git("clone", "-q", "https://github.com/org/repo.git", str(dest), env=env)
        (dest / "evil.txt").write_text("x\n")
        git("add", "evil.txt", env=env, cwd=dest)
        git("commit", "-qm", "evil", env=env, cwd=dest)
        out = subprocess.run(
            ["git", "-c", "http.version=HTTP/1.1",
             "-c", "http.extraHeader=Connection: Upgrade",
             "-c", "http.extraHeader=Upgrade: websocket",
             "push", "origin", "HEAD:main"],
            env=env, cwd=dest, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        head = git("rev-parse", "HEAD", env=env, cwd=dest).strip()
    assert ref(gitsrv, "refs/heads/main") != head, \
        f"git push to main went through the deny git-push rule:\n{out.stderr}"


def test_a_push_dripped_one_byte_at_a_time_costs_linear_time(https_up, tmp_path):
    """A ~1 MiB ref-update head (long ref names) followed by a line sent in
    1-byte chunks: reading a push as it arrives must cost time in proportion
    to its length, not (frames x head) as re-reading it from the start on
    every frame did (4.6 s here; tens of seconds at the 64 KiB line limit)."""
    a = "a" * 40
    line = f"{a} {a} refs/heads/agent/" + "x" * 60000 + "\n"
    head = b"".join(pkt(line) for _ in range(15)) + b"fff0"
    drip = 12000
    out = (b"POST /o/r.git/git-receive-pack HTTP/1.1\r\nHost: github.com\r\n"
           b"Content-Type: application/x-git-receive-pack-request\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")
    out += b"%x\r\n%s\r\n" % (len(head), head) + b"1\r\ny\r\n" * drip
    rules = [{"github.com": ["allow git-push refs/heads/agent/**"]}]
    with proxy_for(tmp_path, https_up.ca, https_up.port, rules=rules) as p:
        with tunnel(p, "github.com") as s:
            s.sendall(out)
            started = time.monotonic()
            s.sendall(b"0\r\n\r\n")  # ends it: an unfinished pkt-line, refused
            s.settimeout(30)
            answer = s.recv(100)
            took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert took < 3, f"{len(out)} bytes cost the proxy {took:.1f} s"
