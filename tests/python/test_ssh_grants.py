"""`moat grant ssh --host H [--key FP]` against a real ssh-agent holding keys
made by ssh-keygen: the agent's fingerprints are recorded, no key material."""

import json
import os
import pathlib
import signal
import subprocess

import pytest

import moat

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOAT = ROOT / "target" / "debug" / "moat"


@pytest.fixture
def agent(tmp_path):
    for tool in ("ssh-agent", "ssh-keygen", "ssh-add"):
        assert subprocess.run(["which", tool], capture_output=True).returncode == 0, \
            f"{tool} is missing: apt-get install openssh-client"
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if sock.exists():
            break
        subprocess.run(["sleep", "0.05"])
    env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
    keys = []
    for name in ("first", "second"):
        key = tmp_path / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test",
                        "-f", str(key)], check=True)
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        keys.append(key)
    listed = subprocess.run(["ssh-add", "-l", "-E", "sha256"], env=env, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    fingerprints = [line.split()[1] for line in listed]
    yield env, fingerprints, keys
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def cli(args, env):
    assert MOAT.exists(), f"{MOAT} is missing: run `cargo build -p moat-cli` first"
    return subprocess.run([str(MOAT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_grant_ssh_records_the_agents_default_key(agent, tmp_path):
    env, fps, keys = agent
    (tmp_path / "user" / ".ssh").mkdir(parents=True)
    env = {**env, "MOAT_HOME": str(tmp_path / "h"), "HOME": str(tmp_path / "user")}
    out = cli(["grant", "ssh", "--host", "github.com"], env)
    assert out.returncode == 0, out.stderr
    assert f"Using key: first@test ({fps[0]})" in out.stderr
    assert "Granted SSH access to github.com" in out.stderr
    assert "warning: no host key for github.com is in ~/.ssh/known_hosts" in out.stderr
    out = cli(["grant", "ssh", "--host", "gitlab.com", "--key", fps[1]], env)
    assert out.returncode == 0, out.stderr
    assert "second@test" in out.stderr
    listed = json.loads(cli(["grant", "list", "--json"], env).stdout)
    by_host = {g["provider"]: g for g in listed}
    assert by_host["ssh:github.com"]["metadata"]["fingerprint"] == fps[0]
    assert by_host["ssh:gitlab.com"]["metadata"]["fingerprint"] == fps[1]
    stored = (tmp_path / "h" / "ssh-grants.json").read_text()
    private = [k.read_text() for k in keys]
    assert "PRIVATE KEY" not in stored and not any(p.splitlines()[1] in stored for p in private)
    assert oct(os.stat(tmp_path / "h" / "ssh-grants.json").st_mode & 0o777) == "0o600"
    out = cli(["revoke", "ssh:github.com"], env)
    assert out.returncode == 0 and "Revoked SSH access to github.com" in out.stderr
    assert [g["provider"] for g in json.loads(cli(["grant", "list", "--json"], env).stdout)] == ["ssh:gitlab.com"]


def test_python_grant_ssh(agent, tmp_path, monkeypatch):
    env, fps, keys = agent
    monkeypatch.setenv("SSH_AUTH_SOCK", env["SSH_AUTH_SOCK"])
    # A HOME of the test's own: its known_hosts, not the developer's.
    user = tmp_path / "user"
    (user / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(user))
    with pytest.warns(UserWarning, match="no host key for github.com is in ~/.ssh/known_hosts"):
        g = moat.grant("ssh", host="GitHub.com", key=fps[1].removeprefix("SHA256:"), home=tmp_path / "h")
    assert g["host"] == "github.com" and g["key"]["fingerprint"] == fps[1]
    assert g["host_keys"] == []
    # With the host's key in known_hosts: recorded, no warning.
    host_key = " ".join(pathlib.Path(f"{keys[0]}.pub").read_text().split()[:2])
    (user / ".ssh" / "known_hosts").write_text(f"github.com {host_key}\n")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = moat.grant("ssh", host="github.com", home=tmp_path / "h")
    assert g["host_keys"] == [host_key]
    assert moat.revoke("ssh:github.com", home=tmp_path / "h") is True


def test_ssh_grant_errors_are_clear(agent, tmp_path):
    env, _, _ = agent
    home = {"MOAT_HOME": str(tmp_path / "h")}
    out = cli(["grant", "ssh", "--host", "github.com"], {**os.environ, **home, "SSH_AUTH_SOCK": ""})
    assert out.returncode == 1 and "SSH_AUTH_SOCK is not set" in out.stderr
    out = cli(["grant", "ssh"], {**env, **home})
    assert out.returncode == 1 and "needs --host" in out.stderr
    out = cli(["grant", "ssh", "--host", "github.com", "--key", "SHA256:nope"], {**env, **home})
    assert out.returncode == 1 and "holds no such key; it holds SHA256:" in out.stderr
    out = cli(["grant", "ssh", "--host", "*.github.com"], {**env, **home})
    assert out.returncode == 1 and "without wildcards" in out.stderr
    subprocess.run(["ssh-add", "-D"], env=env, check=True, capture_output=True)
    out = cli(["grant", "ssh", "--host", "github.com"], {**env, **home})
    assert out.returncode == 1 and "holds no keys" in out.stderr
