"""The audit log of a proxy client: written while the proxy runs, verified
by moat.AuditLog and `moat audit`, exported and checked offline, and the
proxy failing closed when the log cannot be written (a full disk)."""

import json
import os
import pathlib
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

import moat
from upstream import Upstream, make_ca

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOAT = ROOT / "target" / "debug" / "moat"
TOKEN = "ghp_AUDITsecretTOKEN0123456789abcdefgh"


@pytest.fixture
def upstream(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    server = Upstream(cert, key)
    server.ca = ca
    yield server
    server.close()


def proxy(upstream, tmp_path, log):
    cred = moat.Credential(host="api.github.com", header="Authorization",
                           value=f"Bearer {TOKEN}", grant="github")
    return moat.Proxy(credentials=[cred], upstream_ca=upstream.ca, resolve=upstream.resolve(),
                      home=tmp_path / "home", audit_dir=log, name="run_audit")


def get(p, url):
    ctx = ssl.create_default_context(cafile=p.ca_cert_path)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": p.url}),
                                         urllib.request.HTTPSHandler(context=ctx))
    with opener.open(url, timeout=20) as resp:
        return resp.status, resp.read()


def cli(args, tmp_path):
    assert MOAT.exists(), f"{MOAT} is missing: run `cargo build -p moat-cli` first"
    env = {**os.environ, "MOAT_HOME": str(tmp_path / "home")}
    return subprocess.run([str(MOAT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_the_proxy_writes_a_log_that_verifies(upstream, tmp_path):
    log = tmp_path / "log"
    with proxy(upstream, tmp_path, log) as p:
        for i in range(5):
            assert get(p, f"https://api.github.com/r{i}")[0] == 200
        get(p, "https://other.test/x")
    report = moat.AuditLog(log, home=tmp_path / "home").verify()
    types = dict(report["types"])
    assert types["credential_injected"] == 5
    assert types["policy_decision"] >= 2
    assert types["request"] == 6
    requests = [json.loads(line)["data"] for line in (log / "audit.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "request"]
    assert {r["path"] for r in requests} >= {"/r0", "/r4", "/x"}
    assert all(r["status"] == 200 and isinstance(r["duration_us"], int) for r in requests)
    assert [r["grant"] for r in requests].count("github") == 5
    assert report["checkpoints"][-1]["size"] == report["entries"]
    text = (log / "audit.jsonl").read_text()
    assert TOKEN not in text and "api.github.com" in text
    # The CLI says the same, in words and in JSON.
    out = cli(["audit", str(log)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"entries:     {report['entries']}" in out.stdout
    assert report["vkey"] in out.stdout
    assert "Verified: hash chain, Merkle tree and" in out.stderr
    assert json.loads(cli(["audit", str(log), "--json"], tmp_path).stdout)["root"] == report["root"]


def test_tampering_fails_with_the_first_bad_entry_named(upstream, tmp_path):
    log = tmp_path / "log"
    with proxy(upstream, tmp_path, log) as p:
        for i in range(4):
            get(p, f"https://api.github.com/t{i}")
    lines = (log / "audit.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace("api.github.com", "api.github.con")
    (log / "audit.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(moat.ConfigError, match="entry 2 was changed"):
        moat.AuditLog(log, home=tmp_path / "home").verify()
    out = cli(["audit", str(log)], tmp_path)
    assert out.returncode == 1
    assert "entry 2 was changed" in out.stderr


def test_bundles_export_and_verify_offline(upstream, tmp_path):
    log = tmp_path / "log"
    with proxy(upstream, tmp_path, log) as p:
        get(p, "https://api.github.com/b")
    bundle = tmp_path / "proof.json"
    out = cli(["audit", str(log), "--export", str(bundle)], tmp_path)
    assert out.returncode == 0, out.stderr
    vkey = json.loads(cli(["audit", str(log), "--json"], tmp_path).stdout)["vkey"]
    assert cli(["verify-bundle", str(bundle), "--key", vkey], tmp_path).returncode == 0
    report = moat.verify_bundle(bundle, key=vkey)
    assert report["entries"] > 0
    # A home that signed nothing: refused, and no key is created there.
    with pytest.raises(moat.ConfigError, match="no audit signing key"):
        moat.AuditLog(log, home=tmp_path / "other-home").verify()
    assert not (tmp_path / "other-home").exists()
    # Another host's key: its signatures do not verify.
    with moat.Proxy(home=tmp_path / "h2", audit_dir=tmp_path / "log2"):
        pass
    other_vkey = moat.AuditLog(tmp_path / "log2", home=tmp_path / "h2").verify()["vkey"]
    with pytest.raises(moat.ConfigError, match="no valid signature"):
        moat.AuditLog(log, home=tmp_path / "home").verify(key=other_vkey)
    out = cli(["verify-bundle", str(bundle), "--key", other_vkey], tmp_path)
    assert out.returncode == 1 and "is not the expected key" in out.stderr
    # A key that is no key is the caller's mistake, said as such.
    out = cli(["verify-bundle", str(bundle), "--key", "moat+00000000+" + "A" * 44], tmp_path)
    assert out.returncode != 0 and "is not a moat verifier key" in out.stderr, out.stderr
    with pytest.raises(moat.InvalidArgumentError, match="is not a moat verifier key"):
        moat.verify_bundle(bundle, key="moat+00000000+AAAA")
    # The Python export gives the same kind of bundle.
    moat.AuditLog(log, home=tmp_path / "home").export(tmp_path / "py.json")
    assert moat.verify_bundle(tmp_path / "py.json")["root"] == report["root"]


def test_the_proxy_fails_closed_when_the_log_cannot_be_written(upstream, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test mounts a 64 KiB tmpfs and needs root: {mounted.stderr}"
    try:
        codes = []
        p = proxy(upstream, tmp_path, small / "log")
        for i in range(600):
            try:
                codes.append(get(p, f"https://api.github.com/{'x' * 200}{i}")[0])
            except urllib.error.HTTPError as e:
                codes.append(e.code)
                if e.code == 503:
                    assert "the audit log cannot be written" in e.read().decode()
                    break
        assert codes[-1] == 503, "the log never filled"
        # From now on no credential is used.
        seen_before = len(upstream.seen)
        with pytest.raises(urllib.error.HTTPError) as info:
            get(p, "https://api.github.com/after")
        assert info.value.code == 503
        assert len(upstream.seen) == seen_before
        # Hosts without a credential still work (nothing to record there).
        assert get(p, "https://other.test/ok")[0] == 200
        # Closing says why the log is incomplete.
        with pytest.raises(moat.MoatIOError, match="No space left on device"):
            p.close()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    injected = [r for r in upstream.seen if r["authorization"]]
    assert len(injected) == codes.count(200)
