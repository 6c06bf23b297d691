"""moat.Proxy from Python: real clients (urllib, requests, curl) through the
proxy to a local HTTPS upstream. No traffic leaves loopback: every host name
maps to the local server through the proxy's resolve option."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import moat
from upstream import Upstream, make_ca

TOKEN = "ghp_PYTHONsecretTOKEN0123456789abcdef"


@pytest.fixture
def upstream(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    server = Upstream(cert, key)
    server.ca = ca
    yield server
    server.close()


def start(upstream, tmp_path, **kw):
    cred = moat.Credential(host="api.github.com", header="Authorization",
                           value=f"Bearer {TOKEN}", grant="github")
    kw.setdefault("credentials", [cred])
    return moat.Proxy(upstream_ca=upstream.ca, resolve=upstream.resolve(),
                      home=tmp_path / "home", name="py-test", **kw)


def opener(proxy):
    """urllib through the proxy, trusting the moat CA."""
    import ssl
    ctx = ssl.create_default_context(cafile=proxy.ca_cert_path)
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}),
        urllib.request.HTTPSHandler(context=ctx),
    )


def test_urllib_gets_the_credential(upstream, tmp_path):
    with start(upstream, tmp_path) as proxy:
        with opener(proxy).open("https://api.github.com/user", timeout=20) as resp:
            body = json.load(resp)
        assert body["authorization"] == [f"Bearer {TOKEN}"]
        trace = proxy.trace()
    [record] = [r for r in trace if r["url"] == "https://api.github.com/user"]
    assert record["status"] == 200
    assert record["grant"] == "github"
    assert record["client"] == "py-test"
    assert ["authorization", "[redacted]"] in record["request_headers"]
    assert TOKEN not in json.dumps(trace)


def test_a_placeholder_is_replaced(upstream, tmp_path):
    with start(upstream, tmp_path) as proxy:
        req = urllib.request.Request("https://api.github.com/p",
                                     headers={"Authorization": "Bearer placeholder"})
        with opener(proxy).open(req, timeout=20) as resp:
            assert json.load(resp)["authorization"] == [f"Bearer {TOKEN}"]


def test_subprocess_curl_with_env(upstream, tmp_path):
    with start(upstream, tmp_path) as proxy:
        env = {**os.environ, **proxy.env()}
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            assert env[key] == proxy.url
        for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                    "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"):
            assert env[key] == proxy.ca_cert_path
        assert "127.0.0.1" in env["NO_PROXY"]
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "https://api.github.com/user"],
                             env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout)["authorization"] == [f"Bearer {TOKEN}"]


def test_python_requests_in_a_child(upstream, tmp_path):
    try:
        import requests  # noqa: F401
    except ImportError:
        pytest.fail("requests is missing: run bash scripts/setup.sh")
    code = ("import requests, json; r = requests.get('https://api.github.com/r', timeout=20); "
            "print(json.dumps(r.json()))")
    with start(upstream, tmp_path) as proxy:
        env = {**os.environ, **proxy.env()}
        out = subprocess.run([sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["authorization"] == [f"Bearer {TOKEN}"]


def test_strict_mode_blocks_with_the_seeds_message(upstream, tmp_path):
    with start(upstream, tmp_path, policy="strict", allow=["other.test"]) as proxy:
        with pytest.raises(urllib.error.HTTPError) as info:
            opener(proxy).open("http://blocked.example.com/", timeout=20)
        assert info.value.code == 403
        assert info.value.read().decode() == (
            "Moat: request blocked by network policy.\n"
            'Host "blocked.example.com" is not in the allow list.\n'
            "Add it to network.allow in agent.yaml or use policy: permissive.\n")
        with opener(proxy).open("https://other.test/ok", timeout=20) as resp:
            assert resp.status == 200
        events = proxy.audit_events()
    assert any(e["type"] == "policy_decision" and not e["allowed"]
               and e["host"] == "blocked.example.com" for e in events)


def test_no_token_gets_407(upstream, tmp_path):
    with start(upstream, tmp_path) as proxy:
        bare = "http://" + proxy.address
        o = urllib.request.build_opener(urllib.request.ProxyHandler({"http": bare}))
        with pytest.raises(urllib.error.HTTPError) as info:
            o.open("http://other.test/", timeout=20)
        assert info.value.code == 407
        assert info.value.headers["Proxy-Authenticate"] == 'Basic realm="moat"'


def test_redirect_to_another_host_carries_no_credential(upstream, tmp_path):
    with start(upstream, tmp_path) as proxy:
        with opener(proxy).open("https://api.github.com/redirect", timeout=20) as resp:
            assert resp.status == 200  # urllib followed it
    followed = [r for r in upstream.seen if r["path"] == "/after-redirect"]
    assert followed and followed[0]["authorization"] == []
    assert followed[0]["host"] == "other.test"


def test_untrusted_upstream_is_502_and_gets_nothing(upstream, tmp_path):
    cred = moat.Credential(host="api.github.com", header="Authorization", value=f"Bearer {TOKEN}")
    with moat.Proxy(credentials=[cred], resolve=upstream.resolve(), home=tmp_path / "h") as proxy:
        with pytest.raises(urllib.error.HTTPError) as info:
            opener(proxy).open("https://api.github.com/user", timeout=20)
        assert info.value.code == 502
        assert "tls" in info.value.read().decode()
    assert upstream.seen == []


def test_loopback_is_refused(upstream, tmp_path):
    with start(upstream, tmp_path) as proxy:
        for host in ["127.0.0.1", "2130706433", "[::1]", "169.254.169.254"]:
            with pytest.raises(urllib.error.HTTPError) as info:
                opener(proxy).open(f"http://{host}:{upstream.port}/", timeout=20)
            assert info.value.code == 403, host
    assert upstream.seen == []


def test_close_is_idempotent_and_trace_survives(upstream, tmp_path):
    proxy = start(upstream, tmp_path)
    with opener(proxy).open("https://other.test/x", timeout=20):
        pass
    proxy.close()
    proxy.close()
    assert proxy.closed
    assert len(proxy.trace()) == 1
    with pytest.raises(urllib.error.URLError):
        opener(proxy).open("https://other.test/y", timeout=5)


def test_credential_repr_and_errors_never_show_the_value():
    cred = moat.Credential(host="api.github.com", header="x-api-key", value=TOKEN)
    assert TOKEN not in repr(cred)
    assert (cred.host, cred.header, cred.grant) == ("api.github.com", "x-api-key", "custom")
    with pytest.raises(moat.InvalidArgumentError) as info:
        moat.Credential(host="api.github.com", header="x-api-key", value=TOKEN + "\n")
    assert TOKEN not in str(info.value)
    with pytest.raises(moat.InvalidArgumentError, match="host pattern"):
        moat.Credential(host="https://api.github.com", header="a", value="b")


@pytest.mark.parametrize("kwargs, needle", [
    ({"policy": "paranoid"}, "policy: unknown network policy"),
    ({"allow": ["ok.com", "api.*.com"]}, "allow[1]"),
    ({"listen": "nowhere"}, "listen:"),
    ({"resolve": {"api.github.com": "127.0.0.1:1"}}, "resolve:"),
])
def test_bad_options_name_the_option(tmp_path, kwargs, needle):
    with pytest.raises(moat.InvalidArgumentError) as info:
        moat.Proxy(home=tmp_path / "h", **kwargs)
    assert needle in str(info.value)


def test_missing_upstream_ca_file_is_an_io_error(tmp_path):
    with pytest.raises(moat.MoatIOError, match="no such file"):
        moat.Proxy(home=tmp_path / "h", upstream_ca=tmp_path / "missing.pem")


def test_operator_settings_from_the_environment(upstream, tmp_path, monkeypatch):
    """MOAT_UPSTREAM_CA_FILE and MOAT_RESOLVE work without any argument."""
    monkeypatch.setenv("MOAT_UPSTREAM_CA_FILE", upstream.ca)
    monkeypatch.setenv("MOAT_RESOLVE", ",".join(f"{k}={v}" for k, v in upstream.resolve().items()))
    cred = moat.Credential(host="api.github.com", header="Authorization", value=f"Bearer {TOKEN}")
    with moat.Proxy(credentials=[cred], home=tmp_path / "h") as proxy:
        with opener(proxy).open("https://api.github.com/env", timeout=20) as resp:
            assert json.load(resp)["authorization"] == [f"Bearer {TOKEN}"]
    monkeypatch.setenv("MOAT_RESOLVE", "api.github.com=127.0.0.1:1")
    with pytest.raises(moat.InvalidArgumentError, match="MOAT_RESOLVE entry"):
        moat.Proxy(home=tmp_path / "h")


def test_body_capture_is_off_by_default_and_bounded(upstream, tmp_path):
    data = json.dumps({"prompt": "x" * 100}).encode()
    for capture, expected in [(0, None), (16, data[:16].decode())]:
        with start(upstream, tmp_path, capture_bodies=capture) as proxy:
            req = urllib.request.Request("https://other.test/c", data=data,
                                         headers={"Content-Type": "application/json"})
            with opener(proxy).open(req, timeout=20) as resp:
                assert resp.status == 200
            [record] = proxy.trace()
        assert record.get("request_body") == expected
        assert record["request_bytes"] == len(data)
        # The upstream answers JSON: captured too when capture is on.
        if capture:
            assert len(record["response_body"]) == 16
        else:
            assert "response_body" not in record


def test_the_in_memory_trace_is_bounded_and_says_what_it_dropped(upstream, tmp_path):
    """A harness keeps one proxy open for hours: its in-memory trace keeps
    the newest records within trace_limit and trace_bytes, and counts the
    rest."""
    with start(upstream, tmp_path, trace_limit=5) as proxy:
        o = opener(proxy)
        for i in range(12):
            with o.open(f"https://api.github.com/n{i}", timeout=20) as resp:
                resp.read()
        trace = proxy.trace()
        assert [r["url"].rsplit("/", 1)[1] for r in trace] == [f"n{i}" for i in range(7, 12)]
        records, events = proxy.dropped
        assert records == 7 and events > 0
        assert len(proxy.audit_events()) == 5
    with start(upstream, tmp_path / "b", trace_bytes=4096) as proxy:
        o = opener(proxy)
        for i in range(20):
            with o.open(f"https://api.github.com/b{i}", timeout=20) as resp:
                resp.read()
        kept = proxy.trace()
        assert 0 < len(kept) < 20 and kept[-1]["url"].endswith("/b19")
        assert proxy.dropped[0] == 20 - len(kept)
    with pytest.raises((OverflowError, TypeError)):
        start(upstream, tmp_path / "c", trace_limit=-1)
