"""AWS grants: the role is stored, the proxy assumes it through STS with the
host's credentials (SigV4), and serves short-lived credentials to the run
that holds the grant. STS is a local stand-in that checks the signature
with its own SigV4 implementation, written from AWS's documentation."""

import datetime
import hashlib
import hmac
import json
import os
import pathlib
import ssl
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import moat
from runhelp import ENGINE
from upstream import make_ca

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOAT = ROOT / "target" / "debug" / "moat"
ROLE = "arn:aws:iam::123456789012:role/AgentRole"
HOST_KEY, HOST_SECRET = "AKIDHOSTEXAMPLE", "hostSECRETkeyNEVERleaves0123456789"
STS = "sts.us-east-1.amazonaws.com"


def sigv4_ok(method, path, headers, body, secret):
    """Recomputes a SigV4 signature (AWS docs, "Create a signed request")."""
    auth = headers["authorization"]
    algo, rest = auth.split(" ", 1)
    parts = dict(p.strip().split("=", 1) for p in rest.split(","))
    cred_scope = parts["Credential"].split("/", 1)[1]
    date, region, service, _ = cred_scope.split("/")
    signed = parts["SignedHeaders"].split(";")
    canonical = "\n".join([
        method, path, "",
        "".join(f"{h}:{headers[h].strip()}\n" for h in signed),
        ";".join(signed),
        hashlib.sha256(body).hexdigest(),
    ])
    to_sign = "\n".join([algo, headers["x-amz-date"], cred_scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(),
                               parts["Signature"])


class Sts(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        form = dict(urllib.parse.parse_qsl(body.decode()))
        ok = sigv4_ok("POST", self.path, headers, body, HOST_SECRET)
        self.server.calls.append({"form": form, "signature_ok": ok,
                                  "key": headers["authorization"].split("Credential=")[1].split("/")[0]})
        if not ok:
            out = b"<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>bad signature</Message></Error></ErrorResponse>"
            self.send_response(403)
        else:
            n = len(self.server.calls)
            expires = (datetime.datetime.now(datetime.timezone.utc)
                       + datetime.timedelta(seconds=self.server.ttl)).strftime("%Y-%m-%dT%H:%M:%SZ")
            out = f"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult><Credentials><AccessKeyId>ASIASESSION{n}</AccessKeyId>
<SecretAccessKey>sessionSECRET{n}</SecretAccessKey><SessionToken>sessionTOKEN{n}</SessionToken>
<Expiration>{expires}</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>""".encode()
            self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def sts(tmp_path, monkeypatch):
    ca, cert, key = make_ca(tmp_path, names=[STS])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sts)
    server.calls, server.ttl = [], 3600
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MOAT_UPSTREAM_CA_FILE", ca)
    monkeypatch.setenv("MOAT_RESOLVE", f"{STS}:443=127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", HOST_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", HOST_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("MOAT_KEYRING_BACKEND", "file")
    yield server
    server.shutdown()


def fetch(proxy_url, url="http://moat.internal/aws/credentials"):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy_url}))
    with opener.open(url, timeout=20) as resp:
        return json.load(resp)


def test_the_run_gets_short_lived_credentials_and_never_the_host_keys(sts, tmp_path):
    home = tmp_path / "home"
    moat.grant("aws", role=ROLE, home=home)
    [g] = moat.grants(home=home)
    assert g["provider"] == "aws" and g["metadata"]["role_arn"] == ROLE
    with moat.Proxy(grants=["aws"], home=home, name="run-aws") as proxy:
        first = fetch(proxy.url)
        second = fetch(proxy.url)
        events = proxy.audit_events()
    assert first["Version"] == 1
    assert first["AccessKeyId"] == "ASIASESSION1" and first["SessionToken"] == "sessionTOKEN1"
    assert second == first, "cached until five minutes before it expires"
    assert HOST_SECRET not in json.dumps(first)
    [call] = sts.calls
    assert call["signature_ok"] and call["key"] == HOST_KEY
    assert call["form"]["Action"] == "AssumeRole" and call["form"]["RoleArn"] == ROLE
    assert call["form"]["DurationSeconds"] == "900"
    assert call["form"]["RoleSessionName"] == "run-aws"
    assert any(e["type"] == "aws_credentials_issued" and e["role_arn"] == ROLE for e in events)
    assert HOST_SECRET not in json.dumps(events)


def test_credentials_are_refreshed_before_they_expire(sts, tmp_path):
    sts.ttl = 120  # under the five-minute margin: every ask refreshes
    home = tmp_path / "home"
    moat.grant("aws", role=ROLE, home=home, session_duration=3600, external_id="ext-1")
    with moat.Proxy(grants=["aws"], home=home) as proxy:
        a = fetch(proxy.url)
        b = fetch(proxy.url)
    assert a["AccessKeyId"] != b["AccessKeyId"]
    assert len(sts.calls) == 2
    assert sts.calls[0]["form"]["DurationSeconds"] == "3600"
    assert sts.calls[0]["form"]["ExternalId"] == "ext-1"


def test_only_the_granted_client_gets_credentials(sts, tmp_path):
    home = tmp_path / "home"
    moat.grant("aws", role=ROLE, home=home)
    with moat.Proxy(home=home) as proxy:  # no aws grant
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(proxy.url)
        assert info.value.code == 404
        assert b"answers runs with an aws grant" in info.value.read()
    with moat.Proxy(grants=["aws"], home=home) as proxy:
        bare = "http://" + proxy.address
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(bare)
        assert info.value.code == 407
    assert sts.calls == []


def test_sts_refusal_is_a_clear_502(sts, tmp_path, monkeypatch):
    home = tmp_path / "home"
    moat.grant("aws", role=ROLE, home=home)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with moat.Proxy(grants=["aws"], home=home) as proxy:
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(proxy.url)
        assert info.value.code == 502
        assert "bad signature" in info.value.read().decode()


def test_no_role_or_no_host_credentials(sts, tmp_path, monkeypatch):
    with pytest.raises(moat.ConfigError, match="moat grant aws --role=ARN"):
        moat.Proxy(grants=["aws"], home=tmp_path / "empty")
    moat.grant("aws", role=ROLE, home=tmp_path / "h")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(moat.ConfigError, match="no AWS credentials on this host"):
        moat.Proxy(grants=["aws"], home=tmp_path / "h")


def test_cli_grant_aws(sts, tmp_path):
    env = {**os.environ, "MOAT_HOME": str(tmp_path / "h")}
    run = lambda *a: subprocess.run([str(MOAT), *a], env=env, capture_output=True, text=True, timeout=30)
    out = run("grant", "aws", f"--role={ROLE}", "--region=us-west-2", "--session-duration=1h")
    assert out.returncode == 0, out.stderr
    assert f"Granted AWS role {ROLE} (region us-west-2, sessions of 60 min)" in out.stderr
    out = run("grant", "aws", "--role=arn:aws:s3:::bucket")
    assert out.returncode == 1 and "is not an IAM role ARN" in out.stderr
    out = run("grant", "aws", f"--role={ROLE}", "--session-duration=5m")
    assert out.returncode == 1 and "15m to 12h" in out.stderr
    out = run("grant", "aws")
    assert out.returncode == 1 and "needs --role=ARN" in out.stderr
    out = run("revoke", "aws")
    assert out.returncode == 0 and "Revoked the AWS role" in out.stderr


def _image_ready(image):
    try:
        subprocess.run([ENGINE, "image", "inspect", image], check=True, capture_output=True, timeout=20)
        return True
    except Exception:
        return False


IMAGE = os.environ.get("MOAT_TEST_IMAGE", "moat-test:bookworm")


@pytest.mark.skipif(not _image_ready(IMAGE), reason=f"needs a Docker engine and {IMAGE}")
def test_a_run_gets_role_credentials_through_credential_process(sts, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MOAT_HOME", str(home))
    ws = tmp_path / "ws"
    ws.mkdir()
    moat.grant("aws", role=ROLE, home=home)
    script = ("cat /etc/moat/aws-config; $(sed -n 's/^credential_process = //p' \"$AWS_CONFIG_FILE\"); "
              "echo; env | grep '^AWS_' | sort")
    r = moat.run(ws, image=IMAGE, grants=["aws"], command=["sh", "-c", script], home=home)
    try:
        assert r.exit_code == 0, r.stderr
        assert "credential_process = /etc/moat/aws-credentials" in r.output
        assert "region = us-east-1" in r.output
        lines = [l for l in r.output.splitlines() if l.startswith("{")]
        assert lines, (r.output, r.stderr)
        issued = json.loads(lines[0])
        assert issued["Version"] == 1 and issued["AccessKeyId"] == "ASIASESSION1"
        assert "AWS_CONFIG_FILE=/etc/moat/aws-config" in r.output
        # The host's keys never enter the container.
        assert HOST_KEY not in r.output and HOST_SECRET not in r.output
        assert sts.calls[0]["form"]["RoleSessionName"] == r.run_id
        audit = open(os.path.join(r.dir, "audit.jsonl")).read()
        assert "aws_credentials_issued" in audit and HOST_SECRET not in audit
    finally:
        moat.clean(home=home)
