"""`moat trace`: the seeds' line per request in local time, `-v`, and HAR
1.2 (`--har`, `moat.trace_har`), read back with a HAR reader (haralyzer)
and a strict check of the fields HAR 1.2 requires. One real run on the
local test image makes the traffic: api.github.com with the github grant,
other.test (allowed, and refused by a request rule), and down.test, which
nothing answers. Every name maps (MOAT_RESOLVE) to loopback."""

import json
import os
import re
import socket
import stat
from datetime import datetime, timedelta, timezone

import pytest
from haralyzer import HarPage, HarParser

import moat
from runhelp import TOKEN, Moat, make_upstream, require_docker

require_docker()

COOKIE = "sessionCOOKIEvalue0123456789"
AGENT_YAML = """network:
  rules:
    - other.test:
        - deny * /admin/**
"""
SCRIPT = (
    "curl -sS --max-time 20 https://api.github.com/user; echo; "
    f"curl -sS --max-time 20 -o /dev/null -H 'Cookie: session={COOKIE}' "
    "'https://other.test/search?q=moat+trace&page=2&who=a%26b'; "
    "curl -sS --max-time 20 -o /dev/null -X POST -d hello https://other.test/admin/delete; "
    "curl -sS --max-time 20 -o /dev/null https://down.test/; true"
)
# POSIX TZ: UTC+5:30 (the sign is west-positive), no zone files needed.
TZ = "XST-5:30"
OFFSET = timedelta(hours=5, minutes=30)
LINE = re.compile(r"\[(\d\d:\d\d:\d\d\.\d{3})\] ([A-Z]+) (\S+) (\d{3}|-) \((\d+)ms\)(.*)")


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A finished run with four requests; (moat, run id, its JSON records)."""
    upstream = make_upstream(tmp_path_factory.mktemp("upstream"))
    m = Moat(tmp_path_factory.mktemp("trace"), upstream)
    m.env["MOAT_RESOLVE"] += f",down.test:443=127.0.0.1:{closed_port()}"
    try:
        m.grant_github()
        out = m.run(m.workspace(agent_yaml=AGENT_YAML), "sh", "-c", SCRIPT,
                    args=["--grant", "github"], timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout.splitlines()[0]) == {"login": "octocat"}
        run_id = m.latest()["id"]
        records = [json.loads(l) for l in
                   m("trace", run_id, "--json", check=True).stdout.splitlines()]
        assert len(records) == 4, records
        yield m, run_id, records
    finally:
        m.cleanup()
        upstream.close()


def record_for(records, url):
    [r] = [r for r in records if r["url"] == url]
    return r


def local_clock(rfc3339):
    """HH:MM:SS.mmm of an RFC 3339 UTC time, at OFFSET."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z", rfc3339)
    assert m, rfc3339
    y, mo, d, h, mi, s = map(int, m.groups()[:6])
    ms = int(((m.group(7) or "") + "000")[:3])
    t = datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=timezone.utc) + OFFSET
    return t.strftime("%H:%M:%S.") + f"{ms:03d}"


def test_lines_are_the_seeds_in_local_time(traced):
    m, run_id, records = traced
    out = m("trace", run_id, "--network", env={"TZ": TZ}, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == len(records), out
    by_url = {}
    for line in lines:
        match = LINE.fullmatch(line)
        assert match, f"not the seeds' format: {line!r}"
        clock, method, url, status, ms, rest = match.groups()
        by_url[url] = (clock, method, status, rest, line)
    for r in records:
        clock, method, status, _, line = by_url[r["url"]]
        assert clock == local_clock(r["time"]), (line, r["time"])
        assert method == r["method"]
        assert status == (str(r["status"]) if r["status"] is not None else "-")
    # The seeds' line, and the grant whose credential was injected.
    user = by_url["https://api.github.com/user"][4]
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\.\d{3}\] GET https://api\.github\.com/user 200 "
                        r"\(\d+ms\) \[grant: github\]", user), user
    # The refusal and the failure are marked, with the rule and the fault.
    denied = by_url["https://other.test/admin/delete"]
    assert denied[1:3] == ("POST", "403"), denied
    assert denied[3] == " DENIED (rule: deny * /admin/**)", denied
    failed = by_url["https://down.test/"]
    assert failed[2] == "502" and " FAILED (upstream: " in failed[3], failed
    # No rule matched it: the policy (permissive) let it through, and says so.
    ok = by_url["https://other.test/search?q=moat+trace&page=2&who=a%26b"]
    assert ok[2:4] == ("200", " [rule: permissive]"), ok
    # In the order the requests started.
    starts = [local_clock(r["time"]) for r in sorted(records, key=lambda r: r["time"])]
    assert [LINE.fullmatch(l).group(1) for l in lines] == starts
    # Without --network: the same view.
    assert m("trace", run_id, env={"TZ": TZ}, check=True).stdout == out
    assert TOKEN not in out and COOKIE not in out


def test_verbose_adds_headers_and_sizes_with_credentials_redacted(traced):
    m, run_id, records = traced
    out = m("trace", run_id, "--network", "-v", check=True).stdout
    assert TOKEN not in out and COOKIE not in out
    blocks = [b for b in out.split("\n\n") if b.strip()]
    assert len(blocks) == len(records), out
    [user] = [b for b in blocks if "https://api.github.com/user" in b.splitlines()[0]]
    assert "\n    > authorization: [redacted]\n" in user, user
    assert "\n    > sent 0 bytes\n" in user, user
    r = record_for(records, "https://api.github.com/user")
    assert f"\n    < received {r['response_bytes']} bytes" in user, user
    assert "\n    < content-type: application/json\n" in user, user
    [search] = [b for b in blocks if "/search?" in b.splitlines()[0]]
    assert "\n    > cookie: [redacted]\n" in search, search
    [post] = [b for b in blocks if "/admin/delete" in b.splitlines()[0]]
    assert "\n    > sent 0 bytes\n" in post or "\n    > sent 5 bytes\n" in post, post


def check_har(doc):
    """The fields HAR 1.2 requires, with their types; moat's extras."""
    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def pairs(items, where):
        assert isinstance(items, list), where
        for p in items:
            assert isinstance(p.get("name"), str) and isinstance(p.get("value"), str), (where, p)

    log = doc["log"]
    assert log["version"] == "1.2"
    assert log["creator"] == {"name": "moat", "version": moat.__version__}
    assert isinstance(log["entries"], list) and log["entries"]
    for e in log["entries"]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["startedDateTime"]), e
        assert is_num(e["time"]) and e["time"] >= 0
        req, resp = e["request"], e["response"]
        assert isinstance(req["method"], str) and isinstance(req["httpVersion"], str)
        assert re.match(r"[a-z]+://[^/]+", req["url"]), req["url"]
        assert req["cookies"] == [] and resp["cookies"] == []
        pairs(req["headers"], "request.headers")
        pairs(req["queryString"], "request.queryString")
        pairs(resp["headers"], "response.headers")
        assert req["headersSize"] == -1 and resp["headersSize"] == -1
        assert is_num(req["bodySize"]) and is_num(resp["bodySize"])
        if "postData" in req:
            assert isinstance(req["postData"]["mimeType"], str)
            assert isinstance(req["postData"]["text"], str)
        assert isinstance(resp["status"], int) and isinstance(resp["statusText"], str)
        assert isinstance(resp["httpVersion"], str) and isinstance(resp["redirectURL"], str)
        content = resp["content"]
        assert is_num(content["size"]) and isinstance(content["mimeType"], str)
        assert e["cache"] == {}
        t = e["timings"]
        for k in ("send", "wait", "receive"):
            assert is_num(t[k]) and t[k] >= 0, t
        for k in ("blocked", "dns", "connect", "ssl"):
            assert t.get(k, -1) == -1 or t[k] >= 0, t
        assert abs(t["send"] + t["wait"] + t["receive"] - e["time"]) < 1e-6
        extra = {k for k in e if k.startswith("_")}
        assert extra <= {"_client", "_grant", "_denied", "_error", "_fault", "_rule"}, extra


def test_har_loads_in_a_har_reader_with_everything_and_no_secret(traced, tmp_path):
    m, run_id, records = traced
    path = tmp_path / "trace.har"
    out = m("trace", "--har", path, run_id, check=True)
    assert f"Wrote 4 request(s) of " in out.stderr and run_id in out.stderr, out.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert TOKEN not in text and COOKIE not in text
    doc = json.loads(text)
    check_har(doc)
    # To standard output: the same document.
    assert json.loads(m("trace", run_id, "--har", "-", check=True).stdout) == doc

    har = HarParser.from_file(str(path))
    assert har.version == "1.2" and har.creator["name"] == "moat"
    [page] = har.pages
    entries = {e.url: e for e in HarPage("unknown", har_parser=har).entries}
    assert len(entries) == 4, entries
    user = entries["https://api.github.com/user"]
    assert user.request.method == "GET" and user.status == 200
    assert user.request.get_header_value("Authorization") == "[redacted]"
    assert user.response.get_header_value("Content-Type") == "application/json"
    assert user.startTime is not None and user["_grant"] == "github"
    r = record_for(records, "https://api.github.com/user")
    assert user.response["content"]["size"] == r["response_bytes"]
    assert user.response["content"]["mimeType"] == "application/json"

    search = entries["https://other.test/search?q=moat+trace&page=2&who=a%26b"]
    assert search.request.queryString == [{"name": "q", "value": "moat trace"},
                                          {"name": "page", "value": "2"},
                                          {"name": "who", "value": "a&b"}]
    assert search.request.get_header_value("Cookie") == "[redacted]"
    assert "_grant" not in search and "_denied" not in search

    denied = entries["https://other.test/admin/delete"]
    assert denied.status == 403 and denied.request.method == "POST"
    assert denied["_denied"].startswith("rule: ") and denied["_fault"] == "policy"
    assert denied["_rule"] == "deny * /admin/**"

    failed = entries["https://down.test/"]
    assert failed.status == 502 and failed["_fault"] == "upstream"
    assert failed["_error"] == record_for(records, "https://down.test/")["error"]

    # Every record is there, with its time in milliseconds.
    for r in records:
        e = entries[r["url"]]
        assert e["startedDateTime"][:19] == r["time"][:19]
        assert e["time"] == pytest.approx(r["duration_ms"])
        assert e["_client"] == r["client"]


def test_python_trace_har_writes_the_same_document(traced, tmp_path):
    m, run_id, _ = traced
    cli = tmp_path / "cli.har"
    m("trace", "--har", cli, run_id, check=True)
    py = tmp_path / "py.har"
    assert moat.trace_har(run_id, py, home=str(m.home)) == 4
    assert json.loads(py.read_text()) == json.loads(cli.read_text())
    # The most recent run, by default; a run that is not there is an error.
    latest = tmp_path / "latest.har"
    assert moat.trace_har(None, str(latest), home=m.home) == 4
    with pytest.raises(moat.InvalidArgumentError, match="no run matches"):
        moat.trace_har("no-such-run", tmp_path / "x.har", home=str(m.home))
    assert not (tmp_path / "x.har").exists()
    with pytest.raises(moat.MoatIOError):
        moat.trace_har(run_id, tmp_path / "missing-dir" / "x.har", home=str(m.home))
