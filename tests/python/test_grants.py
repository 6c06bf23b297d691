"""Stored credentials: moat.grant / revoke / grants, the `moat grant` CLI
(through a pseudo-terminal for its prompts), GitHub token validation against
a local stand-in for api.github.com, and Proxy(grants=[...])."""

import json
import os
import pathlib
import pty
import select
import subprocess
import time
import urllib.request

import pytest

import moat
from upstream import Upstream, make_ca

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOAT = ROOT / "target" / "debug" / "moat"
GOOD = "ghp_GOODtokenFORtests0123456789abcdefgh"


@pytest.fixture
def github(tmp_path, monkeypatch):
    """A local api.github.com that knows GOOD, and the operator settings that
    point moat at it; the key file instead of any system keyring."""
    ca, cert, key = make_ca(tmp_path)
    server = Upstream(cert, key)
    server.users = {GOOD: "octocat"}
    server.ca = ca
    monkeypatch.setenv("MOAT_UPSTREAM_CA_FILE", ca)
    monkeypatch.setenv("MOAT_RESOLVE", f"api.github.com:443=127.0.0.1:{server.port}")
    monkeypatch.setenv("MOAT_KEYRING_BACKEND", "file")
    for var in ("GITHUB_TOKEN", "GH_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.close()


def files_hold(home, secret):
    for path in pathlib.Path(home).rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            return str(path)
    return None


def test_grant_validates_stores_lists_and_revokes(github, tmp_path):
    home = tmp_path / "home"
    out = moat.grant("github", token=GOOD, home=home)
    assert out["grant"]["metadata"]["login"] == "octocat"
    assert out["grant"]["hosts"] == ["api.github.com", "github.com"]
    assert out["path"] == str(home / "credentials" / "github.enc")
    assert out["key_file"] == str(home / "encryption.key")
    assert GOOD not in json.dumps(out)
    [listed] = moat.grants(home=home)
    assert listed["provider"] == "github" and listed["source"] == "api"
    assert files_hold(home, GOOD) is None
    assert oct(os.stat(home / "credentials" / "github.enc").st_mode & 0o777) == "0o600"
    assert moat.revoke("github", home=home) is True
    assert moat.revoke("github", home=home) is False
    assert moat.grants(home=home) == []


def test_a_rejected_token_is_not_stored(github, tmp_path):
    with pytest.raises(moat.InvalidArgumentError, match="401 Bad credentials"):
        moat.grant("github", token="ghp_wrong", home=tmp_path / "h")
    assert moat.grants(home=tmp_path / "h") == []
    # --no-validate / validate=False skips the check.
    moat.grant("github", token="ghp_unchecked", validate=False, home=tmp_path / "h")
    assert [g["provider"] for g in moat.grants(home=tmp_path / "h")] == ["github"]


def test_tokens_from_the_environment(github, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    out = moat.grant("openai", home=tmp_path / "h")
    assert out["grant"]["source"] == "env:OPENAI_API_KEY"
    with pytest.raises(moat.InvalidArgumentError, match="set ANTHROPIC_API_KEY"):
        moat.grant("anthropic", home=tmp_path / "h")
    with pytest.raises(moat.InvalidArgumentError, match='did you mean "github"'):
        moat.grant("githb", token="x", home=tmp_path / "h")


def test_proxy_grants_inject_stored_credentials(github, tmp_path):
    home = tmp_path / "home"
    moat.grant("github", token=GOOD, home=home)
    resolve = {f"{n}:443": f"127.0.0.1:{github.port}" for n in ("api.github.com", "github.com")}
    with moat.Proxy(grants=["github"], home=home, resolve=resolve, policy="strict") as proxy:
        import ssl
        ctx = ssl.create_default_context(cafile=proxy.ca_cert_path)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": proxy.url}), urllib.request.HTTPSHandler(context=ctx))
        with opener.open("https://api.github.com/user", timeout=20) as resp:
            assert json.load(resp) == {"login": "octocat"}
        with opener.open("https://github.com/org/repo.git/info/refs", timeout=20) as resp:
            seen = json.load(resp)
        import base64
        assert seen["authorization"] == ["Basic " + base64.b64encode(f"x-access-token:{GOOD}".encode()).decode()]
        trace = proxy.trace()
    assert {r["grant"] for r in trace} == {"github"}
    assert GOOD not in json.dumps(trace)
    with pytest.raises(moat.ConfigError, match="run `moat grant openai`"):
        moat.Proxy(grants=["openai"], home=home)


def run_cli(args, env, stdin=None):
    assert MOAT.exists(), f"{MOAT} is missing: run `cargo build -p moat-cli` first"
    return subprocess.run([str(MOAT), *args], env=env, capture_output=True, text=True,
                          input=stdin, timeout=60)


def test_cli_without_a_terminal_never_prompts(github, tmp_path):
    env = {**os.environ, "MOAT_HOME": str(tmp_path / "h")}
    out = run_cli(["grant", "github"], env, stdin="")
    assert out.returncode == 1
    assert "set GITHUB_TOKEN or GH_TOKEN" in out.stderr
    out = run_cli(["grant", "github"], {**env, "GITHUB_TOKEN": GOOD})
    assert out.returncode == 0, out.stderr
    assert "Authenticated as: octocat" in out.stderr
    assert "GitHub credential saved to" in out.stderr
    out = run_cli(["grant", "list", "--json"], env)
    assert json.loads(out.stdout)[0]["metadata"]["login"] == "octocat"
    assert GOOD not in out.stdout + out.stderr
    out = run_cli(["revoke", "github"], env)
    assert out.returncode == 0 and "Revoked GitHub credentials" in out.stderr


def pty_run(args, env, answers, timeout=30):
    """Runs moat on a pseudo-terminal, answering each (prompt, reply) in turn;
    returns (exit code, everything printed)."""
    assert MOAT.exists(), f"{MOAT} is missing: run `cargo build -p moat-cli` first"
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(str(MOAT), [str(MOAT), *args], env)
    out = b""
    pending = list(answers)
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if pending and pending[0][0].encode() in out:
            os.write(fd, pending.pop(0)[1].encode())
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_cli_asks_to_use_the_gh_token_on_a_terminal(github, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gh = bin_dir / "gh"
    gh.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'auth token' ] && echo {GOOD}\n")
    gh.chmod(0o755)
    env = {**os.environ, "MOAT_HOME": str(tmp_path / "h"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code, out = pty_run(["grant", "github"], env, [("Use token from gh CLI? [Y/n]:", "y\n")])
    assert code == 0, out
    assert "Found gh CLI authentication" in out
    assert "Validating token..." in out and "Authenticated as: octocat" in out
    assert GOOD not in out
    [g] = moat.grants(home=tmp_path / "h")
    assert g["source"] == "gh"


def test_cli_hidden_prompt_when_gh_is_declined(github, tmp_path):
    env = {**os.environ, "MOAT_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"}
    code, out = pty_run(["grant", "github"], env, [("GitHub personal access token:", GOOD + "\n")])
    assert code == 0, out
    assert GOOD not in out, "the token was echoed"
    assert moat.grants(home=tmp_path / "h")[0]["source"] == "prompt"


def test_the_hidden_prompt_never_echoes_a_token_typed_at_once(github, tmp_path):
    """The token is typed the moment the prompt appears, many times over:
    echo must already be off when the prompt is shown (it once was turned
    off only after, and a fast typist's token was echoed)."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    for i in range(25):
        env["MOAT_HOME"] = str(tmp_path / f"h{i}")
        code, out = pty_run(["grant", "github"], env, [("GitHub personal access token: ", GOOD + "\n")])
        assert code == 0, out
        assert GOOD not in out, f"round {i}: the token was echoed: {out!r}"


def test_cli_imports_claude_code_credentials(github, tmp_path):
    user = tmp_path / "user"
    (user / ".claude").mkdir(parents=True)
    expires_ms = int((time.time() + 3600) * 1000)
    (user / ".claude" / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": "sk-ant-oat01-SECRET", "refreshToken": "r", "expiresAt": expires_ms,
        "subscriptionType": "claude_pro"}}))
    env = {**os.environ, "MOAT_HOME": str(tmp_path / "h"), "HOME": str(user)}
    code, out = pty_run(["grant", "anthropic"], env, [("Use Claude Code credentials? [Y/n]:", "\n")])
    assert code == 0, out
    assert "Found Claude Code credentials." in out and "Subscription: claude_pro" in out
    [g] = moat.grants(home=tmp_path / "h")
    assert g["kind"] == "oauth" and g["source"] == "claude-code" and g["expires"]
    assert files_hold(tmp_path / "h", "sk-ant-oat01-SECRET") is None
    # An expired login is a clear error now.
    (user / ".claude" / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": "sk-ant-oat01-OLD", "expiresAt": 1000}}))
    code, out = pty_run(["grant", "anthropic"], env, [("Use Claude Code credentials? [Y/n]:", "y\n")])
    assert code == 1 and "expired" in out and "no refresh token" in out, out
    # An expired one that can be refreshed is taken: runs refresh it on the host.
    (user / ".claude" / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": "sk-ant-oat01-OLD", "refreshToken": "sk-ant-ort01-R", "expiresAt": 1000}}))
    code, out = pty_run(["grant", "anthropic"], env, [("Use Claude Code credentials? [Y/n]:", "y\n")])
    assert code == 0, out
    [g] = moat.grants(home=tmp_path / "h")
    assert g["metadata"]["credentials_file"] == str(user / ".claude" / ".credentials.json"), g
    assert files_hold(tmp_path / "h", "sk-ant-ort01-R") is None, "the refresh token stays in its file"


def test_concurrent_grant_processes_never_corrupt_the_store(github, tmp_path):
    """Eight `moat grant` processes at once on a fresh home: one key is made,
    every write is whole, and the store decrypts afterwards."""
    home = tmp_path / "race"
    env = {**os.environ, "MOAT_HOME": str(home)}
    procs = []
    for i in range(8):
        provider = "github" if i % 2 else "openai"
        var = "GITHUB_TOKEN" if provider == "github" else "OPENAI_API_KEY"
        procs.append(subprocess.Popen(
            [str(MOAT), "grant", provider, "--no-validate"],
            env={**env, var: f"token-{i}"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    listed = moat.grants(home=home)
    assert sorted(g["provider"] for g in listed) == ["github", "openai"]
    assert all(g["problem"] is None for g in listed), listed
    leftovers = [p.name for p in (home / "credentials").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
