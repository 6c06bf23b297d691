"""A stand-in for Anthropic's API (api.anthropic.com) and OAuth token endpoint
(platform.claude.com), good enough for the real Claude Code to run against:
HTTPS with a test CA made by the openssl command, on a configurable address.
It records what it receives.

It answers 200 only when a request carries the configured real credential:
`x-api-key: <api_key>`, or `authorization: Bearer <access_token>` (on /v1/messages
together with an `anthropic-beta` header naming oauth-2025-04-20, as
Claude Code sends it; its other calls, such as /api/oauth/profile, have
no such beta header).
Anything else gets Anthropic's 401 error JSON. Unauthenticated GET /api/hello
and /v1/oauth/hello (Claude Code's onboarding connectivity check) get 200. POST /v1/oauth/token rotates the OAuth tokens
when given the current refresh token.

From pytest:

    s = StandIn(tmp_path, api_key="sk-ant-api03-real", reply="MOAT-STANDIN-REPLY")
    ... point a client (or the proxy's resolve map) at 127.0.0.1:s.port,
        trusting s.ca_pem ...
    s.seen         # every request: method, path, host, headers, body
    s.refreshes    # how many POST /v1/oauth/token calls
    s.fail_refresh = True   # the token endpoint answers 400 invalid_grant
    s.close()

Standalone (e.g. in a container on an internal docker network):

    python3 anthropic_standin.py --addr 0.0.0.0 --port 443 --dir /tmp/s \\
        --api-key sk-ant-api03-... --access-token sk-ant-oat01-... \\
        --refresh-token sk-ant-ort01-...
"""

import argparse
import json
import os
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Every name the certificate covers; Claude Code 2.1.x talks to the first two.
NAMES = [
    "api.anthropic.com",
    "platform.claude.com",
    "console.anthropic.com",
    "claude.ai",
    "claude.com",
    "statsig.anthropic.com",
    "downloads.claude.ai",
    "storage.googleapis.com",
    "mcp-proxy.anthropic.com",
    "localhost",
]

OAUTH_BETA = "oauth-2025-04-20"
DEFAULT_REPLY = "MOAT-STANDIN-REPLY"
INTERESTING = ("authorization", "x-api-key", "anthropic-beta", "anthropic-version",
               "user-agent", "x-app", "content-type", "proxy-authorization")


def make_ca(directory, names=None):
    """Creates a test CA and a leaf for `names` (default NAMES) in `directory`;
    returns (ca_pem, cert, key)."""
    names = names or NAMES
    d = str(directory)
    os.makedirs(d, exist_ok=True)
    ca_key, ca_pem = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    key, csr, cert = (os.path.join(d, n) for n in ("leaf.key", "leaf.csr", "leaf.pem"))
    ext = os.path.join(d, "ext.cnf")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", ca_key, "-out", ca_pem, "-days", "2",
        "-subj", "/CN=anthropic stand-in test ca")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=" + names[0])
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join("DNS:" + n for n in names) + "\n")
        f.write("extendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key,
        "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
    for p in (ca_pem, cert):
        os.chmod(p, 0o644)
    return ca_pem, cert, key


def error_body(kind, message):
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_standin_" + uuid.uuid4().hex[:16]}


def prompt_text(body):
    """The text of the last user message's last text block (what the user typed
    into Claude Code), or ''."""
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content or []
                 if isinstance(b, dict) and b.get("type") == "text"
                 and not b.get("text", "").lstrip().startswith("<system-reminder>")]
        if texts:
            return texts[-1]
    return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # --- plumbing -------------------------------------------------------

    def _send_json(self, status, obj, extra=None):
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("request-id", "req_standin_" + uuid.uuid4().hex[:16])
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def _send_sse(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", "req_standin_" + uuid.uuid4().hex[:16])
        self.end_headers()
        for name, data in events:
            chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _authorized(self, rec):
        st = self.server.standin
        key = self.headers.get("x-api-key")
        if key is not None:
            return st.api_key is not None and key == st.api_key
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            if st.access_token is None or auth[7:] != st.access_token:
                return False
            # /v1/messages takes an OAuth token only with this beta; Claude
            # Code's other calls (/api/oauth/profile, /v1/mcp_servers) send
            # the bearer token without it.
            if not self.path.startswith("/v1/messages"):
                return True
            betas = ",".join(self.headers.get_all("anthropic-beta") or [])
            return OAUTH_BETA in [b.strip() for b in betas.split(",")]
        return False

    def _deny(self):
        self._send_json(401, error_body("authentication_error", "invalid x-api-key"))

    def _handle(self):
        st = self.server.standin
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            raw = self._read_chunked()
        path = self.path.split("?", 1)[0]
        rec = {
            "time": time.time(),
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": raw.decode("utf-8", "replace"),
        }
        for h in INTERESTING:
            rec[h] = self.headers.get_all(h) or []
        with st.lock:
            st.seen.append(rec)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}

        if path == "/v1/oauth/token" and self.command == "POST":
            return self._token(body)
        # Claude Code's preflight connectivity check (onboarding) fetches
        # https://api.anthropic.com/api/hello and
        # https://platform.claude.com/v1/oauth/hello without credentials and
        # needs 200 from both.
        if path in ("/api/hello", "/v1/oauth/hello"):
            return self._send_json(200, {"message": "hello"})
        if not self._authorized(rec):
            return self._deny()
        rec["authorized"] = True

        if path == "/v1/messages" and self.command == "POST":
            return self._messages(body)
        if path == "/v1/messages/count_tokens" and self.command == "POST":
            n = max(1, len(json.dumps(body.get("messages", ""))) // 4)
            return self._send_json(200, {"input_tokens": n})
        if path == "/api/oauth/profile":
            return self._send_json(200, st.profile())
        if path == "/api/oauth/claude_cli/roles":
            return self._send_json(200, {"organization_role": "admin",
                                         "workspace_role": None,
                                         "organization_name": "Stand-in Org"})
        if path == "/v1/mcp_servers" and self.command == "GET":
            return self._send_json(200, {"data": [], "has_more": False, "next_page": None})
        if path.startswith("/api/event_logging"):
            return self._send_json(200, {})
        if path == "/v1/models" and self.command == "GET":
            return self._send_json(200, {"data": [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in st.models], "has_more": False,
                "first_id": st.models[0], "last_id": st.models[-1]})
        if path in st.extra_ok:
            return self._send_json(200, st.extra_ok[path])
        self._send_json(404, error_body("not_found_error", "Not found"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def _read_chunked(self):
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    # --- endpoints ------------------------------------------------------

    def _token(self, body):
        st = self.server.standin
        with st.lock:
            st.refreshes += 1
            st.refresh_requests.append(body)
            if (st.fail_refresh or body.get("grant_type") != "refresh_token"
                    or st.refresh_token is None
                    or body.get("refresh_token") != st.refresh_token):
                status = st.fail_refresh if isinstance(st.fail_refresh, int) and \
                    not isinstance(st.fail_refresh, bool) else 400
                return self._send_json(status, {
                    "error": "invalid_grant",
                    "error_description": "Invalid refresh token"})
            n = st.refreshes
            st.access_token = f"sk-ant-oat01-standin-access-{n}-{uuid.uuid4().hex[:12]}"
            st.refresh_token = f"sk-ant-ort01-standin-refresh-{n}-{uuid.uuid4().hex[:12]}"
            out = {"token_type": "Bearer", "access_token": st.access_token,
                   "refresh_token": st.refresh_token, "expires_in": st.expires_in,
                   "scope": body.get("scope") or
                   "user:inference user:profile user:sessions:claude_code",
                   "organization": {"uuid": st.org_uuid, "name": "Stand-in Org"},
                   "account": {"uuid": st.account_uuid,
                               "email_address": "standin@example.com"}}
        self._send_json(200, out)

    def _messages(self, body):
        st = self.server.standin
        model = body.get("model") or "claude-standin"
        blocks = st.reply(body) if callable(st.reply) else default_reply(st.reply, body)
        if isinstance(blocks, str):
            blocks = [{"type": "text", "text": blocks}]
        text = "".join(b.get("text", "") for b in blocks)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        usage = {"input_tokens": max(1, len(json.dumps(body.get("messages", ""))) // 4),
                 "output_tokens": max(1, len(text) // 4),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        msg_id = "msg_standin_" + uuid.uuid4().hex[:20]
        if not body.get("stream"):
            return self._send_json(200, {
                "id": msg_id, "type": "message", "role": "assistant", "model": model,
                "content": blocks, "stop_reason": stop, "stop_sequence": None,
                "usage": usage})
        events = [
            ("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": dict(usage, output_tokens=1)}}),
            ("ping", {"type": "ping"}),
        ]
        for i, b in enumerate(blocks):
            if b["type"] == "tool_use":
                events.append(("content_block_start", {
                    "type": "content_block_start", "index": i,
                    "content_block": {"type": "tool_use", "id": b["id"], "name": b["name"],
                                      "input": {}}}))
                events.append(("content_block_delta", {
                    "type": "content_block_delta", "index": i,
                    "delta": {"type": "input_json_delta",
                              "partial_json": json.dumps(b["input"])}}))
            else:
                t = b.get("text", "")
                half = len(t) // 2
                events.append(("content_block_start", {
                    "type": "content_block_start", "index": i,
                    "content_block": {"type": "text", "text": ""}}))
                for part in (t[:half], t[half:]):
                    events.append(("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "text_delta", "text": part}}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        events += [
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._send_sse(events)


def tool_results(body):
    """The text of tool_result blocks in the last user message, or None."""
    msgs = body.get("messages") or []
    if not msgs or msgs[-1].get("role") != "user" or not isinstance(msgs[-1].get("content"), list):
        return None
    out = []
    for b in msgs[-1]["content"]:
        if isinstance(b, dict) and b.get("type") == "tool_result":
            c = b.get("content")
            if isinstance(c, list):
                c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
            out.append(str(c or ""))
    return out or None


def default_reply(reply, body):
    """The stand-in's answer when `reply` is a string: "<reply>: <prompt>"; a
    prompt "RUN: <command>" gets a Bash tool_use for <command>, and the
    following turn (carrying the tool_result) gets "<reply>: tool result: ..."."""
    results = tool_results(body)
    if results is not None:
        return f"{reply}: tool result: {' | '.join(results)[:1000]}"
    prompt = prompt_text(body)
    if prompt.startswith("RUN:"):
        return [{"type": "tool_use", "id": "toolu_standin_" + uuid.uuid4().hex[:16],
                 "name": "Bash", "input": {"command": prompt[4:].strip(),
                                           "description": "stand-in command"}}]
    return f"{reply}: {prompt[:200]}"


class StandIn:
    """The stand-in server. Attributes tests may read or change while it runs:
    api_key, access_token, refresh_token (the currently valid credentials;
    None accepts nothing), reply (a string, answered as "<reply>: <prompt>",
    or a function of the request body returning the whole text), fail_refresh
    (True, or an HTTP status, makes the token endpoint fail), expires_in,
    extra_ok (path -> JSON answered with 200 to authorized requests).
    Read: port, ca_pem, seen, refreshes, refresh_requests."""

    def __init__(self, directory, api_key=None, access_token=None, refresh_token=None,
                 reply=DEFAULT_REPLY, addr="127.0.0.1", port=0, names=None):
        self.ca_pem, self.cert, self.key = make_ca(directory, names)
        self.api_key, self.access_token, self.refresh_token = api_key, access_token, refresh_token
        self.reply = reply
        self.fail_refresh = False
        self.expires_in = 28800
        self.refreshes = 0
        self.refresh_requests = []
        self.seen = []
        self.extra_ok = {}
        self.models = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]
        self.account_uuid = "00000000-0000-4000-8000-00000000acc7"
        self.org_uuid = "00000000-0000-4000-8000-000000000a9c"
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((addr, port), Handler)
        self.server.daemon_threads = True
        self.server.standin = self
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def profile(self):
        """GET /api/oauth/profile, shaped like the real answer."""
        return {
            "account": {"uuid": self.account_uuid, "full_name": "Stand In",
                        "display_name": "Stand In", "email": "standin@example.com",
                        "has_claude_max": True, "has_claude_pro": False,
                        "created_at": "2025-01-01T00:00:00Z"},
            "organization": {"uuid": self.org_uuid, "name": "Stand-in Org",
                             "organization_type": "claude_max",
                             "billing_type": "stripe_subscription",
                             "rate_limit_tier": "default_claude_max_20x",
                             "has_extra_usage_enabled": False},
        }

    def requests_to(self, path):
        """The recorded requests whose path (without query) is `path`."""
        return [r for r in self.seen if r["path"].split("?", 1)[0] == path]

    def resolve(self, ip="127.0.0.1"):
        """A proxy resolve map: every certificate name to this server."""
        return {f"{n}:443": f"{ip}:{self.port}" for n in NAMES}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dir", required=True, help="where the CA and leaf are written")
    p.add_argument("--api-key")
    p.add_argument("--access-token")
    p.add_argument("--refresh-token")
    p.add_argument("--reply", default=DEFAULT_REPLY)
    p.add_argument("--fail-refresh", action="store_true",
                   help="the token endpoint answers 400 invalid_grant")
    p.add_argument("--log", help="append every request as a JSON line to this file")
    a = p.parse_args()
    s = StandIn(a.dir, api_key=a.api_key, access_token=a.access_token,
                refresh_token=a.refresh_token, reply=a.reply, addr=a.addr, port=a.port)
    s.fail_refresh = a.fail_refresh
    print(f"listening on {a.addr}:{s.port}; CA {s.ca_pem}", flush=True)
    done = 0
    try:
        while True:
            time.sleep(0.2)
            with s.lock:
                new = s.seen[done:]
                done = len(s.seen)
            for r in new:
                line = json.dumps(r)
                print(line, flush=True)
                if a.log:
                    with open(a.log, "a") as f:
                        f.write(line + "\n")
    except KeyboardInterrupt:
        pass
    finally:
        s.close()


if __name__ == "__main__":
    main()
