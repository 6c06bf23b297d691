"""`moat claude` end to end: the real Claude Code (the pinned build, from the
claude-agent-sdk wheel scripts/setup.sh downloads into target/claude) in a
container of the image moat makes, talking through the run's proxy to a local
stand-in for Anthropic's API (tests/python/anthropic_standin.py), which
answers only the real key or token.

No traffic leaves this host: api.anthropic.com and platform.claude.com map
(MOAT_RESOLVE) to the stand-in on loopback, trusted through
MOAT_UPSTREAM_CA_FILE; strict runs block everything else."""

import glob
import json
import os
import time
from pathlib import Path

import pytest

from anthropic_standin import StandIn
from runhelp import ENGINE, IMAGE, Moat, files_holding, require_docker, sh
from test_run_tty import Terminal

require_docker()

ROOT = Path(__file__).resolve().parents[2]
WHEELS = sorted(glob.glob(str(ROOT / "target" / "claude" / "claude_agent_sdk-*.whl")))
API_KEY = "sk-ant-api03-REAL-moat-test-key-7Q2xV9"
ACCESS = "sk-ant-oat01-REAL-moat-test-access-K3"
REFRESH = "sk-ant-ort01-REAL-moat-test-refresh-P8"
SECRETS = {"api key": API_KEY, "access token": ACCESS, "refresh token": REFRESH}
RUN_FILES = ("run.json", "logs.jsonl", "network.jsonl", "audit.jsonl", "supervisor.log")


@pytest.mark.one_engine
def test_the_wheel_is_there():
    assert WHEELS, "no claude-agent-sdk wheel in target/claude: run bash scripts/setup.sh"


@pytest.fixture
def standin(tmp_path):
    s = StandIn(tmp_path / "standin", api_key=API_KEY, access_token=ACCESS,
                refresh_token=REFRESH, reply="MOAT-STANDIN-REPLY")
    yield s
    s.close()


@pytest.fixture
def m(tmp_path, standin):
    moat = Moat(tmp_path)
    moat.env["MOAT_CLAUDE_WHEEL"] = WHEELS[-1] if WHEELS else "/nonexistent.whl"
    moat.env["MOAT_UPSTREAM_CA_FILE"] = standin.ca_pem
    moat.env["MOAT_RESOLVE"] = ",".join(
        f"{h}:443=127.0.0.1:{standin.port}" for h in ("api.anthropic.com", "platform.claude.com"))
    moat.env.pop("ANTHROPIC_API_KEY", None)
    moat.env.pop("CLAUDE_CONFIG_DIR", None)
    yield moat
    moat.cleanup()


def grant_key(m):
    m("grant", "anthropic", env={"ANTHROPIC_API_KEY": API_KEY}, check=True)


def grant_login(m, tmp_path, expires_in=3600):
    """Imports a Claude Code OAuth login from a host credentials file, as
    `moat grant anthropic` does on a terminal (here through the library)."""
    user_home = tmp_path / "user"
    (user_home / ".claude").mkdir(parents=True)
    creds = user_home / ".claude" / ".credentials.json"
    creds.write_text(json.dumps({"claudeAiOauth": {
        "accessToken": ACCESS, "refreshToken": REFRESH,
        "expiresAt": int((time.time() + expires_in) * 1000),
        "scopes": ["user:inference", "user:profile", "user:sessions:claude_code"],
        "subscriptionType": "max"}}))
    os.chmod(creds, 0o600)
    m("grant", "anthropic", "--from-claude-code", env={"HOME": str(user_home)}, check=True)
    return creds


def claude(m, ws, *args, timeout=240):
    return m("claude", ws, "--image", IMAGE, *args, timeout=timeout)


def no_secret_anywhere(m, run_id, ws, secrets=SECRETS):
    """No key or token in the run's files, Claude Code's state, the
    workspace, or (when it runs) the container's environment and files."""
    paths = [m.dir(run_id) / f for f in RUN_FILES]
    for root in [m.home / "claude", ws]:
        paths += [p for p in root.rglob("*") if p.is_file()]
    for name, value in secrets.items():
        leaks = files_holding(paths, value)
        assert leaks == [], f"the {name} is in {leaks}"


def test_claude_p_answers_through_the_stand_in_with_the_key_injected(m, standin, tmp_path):
    grant_key(m)
    ws = m.workspace()
    # A base image of this test's own (the test image with a unique label),
    # so the image of Claude Code on it cannot exist yet, whatever else runs.
    tag = f"moat-test-claude-base:{os.getpid()}-{int(time.time() * 1000)}"
    probe = sh(ENGINE, "create", IMAGE, "true", check=True).stdout.strip()
    sh(ENGINE, "commit", "--change", f"LABEL moat.test.unique={tag}", probe, tag, check=True)
    sh(ENGINE, "rm", "-f", probe)
    try:
        _first_and_second_runs(m, ws, standin, tag)
    finally:
        built = sh(ENGINE, "images", "-q", "--filter", f"label=moat.test.unique={tag}").stdout.split()
        sh(ENGINE, "rmi", "-f", *set(built) | {tag})


def _first_and_second_runs(m, ws, standin, base):
    out = m("claude", ws, "--image", base, "-p", "say hi", timeout=240)
    assert out.returncode == 0, out.stderr
    assert "MOAT-STANDIN-REPLY: say hi" in out.stdout
    # The first run made the image, with progress.
    assert "Unpacking Claude Code 2.1.332" in out.stderr, out.stderr
    assert "Building image moat-claude:" in out.stderr and "Built image" in out.stderr
    messages = standin.requests_to("/v1/messages")
    assert messages, standin.seen
    assert all(r["headers"].get("x-api-key") == API_KEY for r in messages)
    run = m.latest()
    assert run["agent"] == "claude" and run["image"].startswith("moat-claude:")
    # The image says what it is, and belongs to no run.
    labels = json.loads(sh(ENGINE, "image", "inspect", run["image"], "--format",
                           "{{json .Config.Labels}}", check=True).stdout)
    assert labels["dev.moat.agent"] == "claude" and labels["dev.moat.claude.version"] == "2.1.332"
    assert labels.get("dev.moat.run", "") == "" and labels.get("dev.moat.home", "") == ""
    assert run["state"] == "stopped" and run["exit_code"] == 0
    no_secret_anywhere(m, run["id"], ws)
    # What the container saw: a placeholder, never the key.
    placeholders = [r for r in standin.seen
                    if "moat-placeholder" in json.dumps(r.get("headers", {}))]
    assert placeholders == [], "the placeholder reached the API"
    # The second run reuses the image at once.
    out = m("claude", ws, "--image", base, "-p", "again", timeout=240)
    assert out.returncode == 0, out.stderr
    assert "Building image" not in out.stderr and "Unpacking" not in out.stderr, out.stderr
    assert "MOAT-STANDIN-REPLY: again" in out.stdout


def test_the_container_holds_only_placeholders(m, standin):
    grant_key(m)
    ws = m.workspace()
    out = claude(m, ws, "-p", "x", "--", "--version")
    # `claude -p x --version` prints the version: the binary is the pinned one.
    assert out.returncode == 0, out.stderr
    assert "2.1.332" in out.stdout
    out = m("claude", ws, "--image", IMAGE, "-d", "--name", "probe", "-p", "hello", timeout=240)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    assert m.wait_state(run_id, ("stopped", "failed"), timeout=120) == "stopped"
    assert m.wait_log(run_id, "MOAT-STANDIN-REPLY: hello")
    # A container of the same image and state as the run, to look inside.
    state = next((m.home / "claude").iterdir())
    env = sh(ENGINE, "run", "--rm", "-v", f"{state}:/home/.claude-moat:ro", m.meta(run_id)["image"],
             "sh", "-c", "cat /home/.claude-moat/.claude.json; ls -a /home/.claude-moat")
    assert env.returncode == 0, env.stderr
    assert API_KEY not in env.stdout
    no_secret_anywhere(m, run_id, ws)


@pytest.mark.one_engine
def test_sessions_lists_claude_runs_and_continue_works_across_runs(m, standin):
    grant_key(m)
    ws = m.workspace()
    out = claude(m, ws, "-p", "first", "--name", "feature-a")
    assert out.returncode == 0, out.stderr
    m("run", ws, "--image", IMAGE, "--", "true", check=True)
    sessions = json.loads(m("claude", "sessions", "--json", check=True).stdout)
    assert [s["name"] for s in sessions] == ["feature-a"], sessions
    assert set(sessions[0]) >= {"name", "id", "state", "created_at", "workspace"}
    table = m("claude", "sessions", check=True).stdout
    assert "feature-a" in table and "WORKSPACE" in table
    # Claude Code's history for this workspace is on the host...
    history = list((m.home / "claude").glob("*/projects/-workspace/*.jsonl"))
    assert history, list((m.home / "claude").rglob("*"))
    # ... so --continue in a later run sees the earlier conversation.
    standin.reply = lambda body: "SEEN-FIRST" if "first" in json.dumps(body) else "NOT-SEEN"
    out = claude(m, ws, "-p", "second", "--", "--continue")
    assert out.returncode == 0, out.stderr
    assert "SEEN-FIRST" in out.stdout, out.stdout


def test_strict_mode_lets_claude_work_and_blocks_the_rest(m, standin):
    grant_key(m)
    ws = m.workspace(agent_yaml="network:\n  policy: strict\n")
    out = claude(m, ws, "-p", "strict hello")
    assert out.returncode == 0, out.stderr
    assert "MOAT-STANDIN-REPLY: strict hello" in out.stdout
    run = m.latest()
    # The plugin marketplace and anything else outside the preset is refused.
    trace = [json.loads(l) for l in (m.dir(run["id"]) / "network.jsonl").read_text().splitlines()]
    allowed = {r["host"] for r in trace if not r.get("denied")}
    assert allowed <= {"api.anthropic.com", "platform.claude.com", "console.anthropic.com"}, allowed


@pytest.mark.one_engine
def test_a_strict_session_refuses_every_host_outside_the_preset(m, standin):
    """From inside a running strict session: a host the preset does not
    name (Claude Code's own download host among them) gets moat's refusal,
    while the API's host goes through to the stand-in."""
    grant_key(m)
    ws = m.workspace(agent_yaml="network:\n  policy: strict\n")
    out = m("claude", ws, "--image", IMAGE, "-d", "--name", "strict-inside", timeout=240)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    try:
        assert m.wait_state(run_id, ("running",), timeout=60) == "running"
        meta = m.meta(run_id)
        script = ("for u in https://downloads.claude.ai/claude-code https://github.com/x "
                  "https://statsig.anthropic.com/v1 https://api.anthropic.com/v1/messages; do "
                  "printf '%s ' $u; curl -s -o /tmp/body -w '%{http_code} ' $u; "
                  "head -c 60 /tmp/body | tr '\\n' ' '; echo; done")
        look = sh(ENGINE, "exec", "-u", meta["user"], meta["container"], "sh", "-c", script,
                  timeout=60)
        assert look.returncode == 0, look.stderr
        lines = dict(line.split(" ", 1) for line in look.stdout.splitlines() if " " in line)
        for url in ("https://downloads.claude.ai/claude-code", "https://github.com/x",
                    "https://statsig.anthropic.com/v1"):
            assert lines[url].startswith("403 Moat: request blocked by network policy"), look.stdout
        api = lines["https://api.anthropic.com/v1/messages"]
        # The stand-in answered (not moat's refusal, not a failed connection).
        assert not api.startswith(("403", "000")), look.stdout
    finally:
        m("stop", run_id, "-t", "1", timeout=60)


@pytest.mark.one_engine
def test_an_oauth_login_is_injected_and_never_enters_the_container(m, standin, tmp_path):
    creds = grant_login(m, tmp_path)
    before = creds.read_bytes()
    ws = m.workspace()
    out = claude(m, ws, "-p", "oauth hello")
    assert out.returncode == 0, out.stderr
    assert "MOAT-STANDIN-REPLY: oauth hello" in out.stdout
    messages = standin.requests_to("/v1/messages")
    assert messages and all(r["headers"].get("authorization") == f"Bearer {ACCESS}"
                            for r in messages)
    # The container's login is a placeholder.
    state = next((m.home / "claude").iterdir())
    inside = json.loads((state / ".credentials.json").read_text())
    assert inside["claudeAiOauth"]["accessToken"].endswith("moat-placeholder")
    assert creds.read_bytes() == before, "no refresh was due"
    no_secret_anywhere(m, m.latest()["id"], ws)


@pytest.mark.one_engine
def test_a_login_expiring_during_the_session_is_refreshed_on_the_host(m, standin, tmp_path):
    creds = grant_login(m, tmp_path, expires_in=60)
    # Refresh within 5 minutes of expiry: the first request refreshes.
    ws = m.workspace()
    out = claude(m, ws, "-p", "refresh me")
    assert out.returncode == 0, out.stderr
    assert "MOAT-STANDIN-REPLY: refresh me" in out.stdout
    assert standin.refreshes == 1
    new = json.loads(creds.read_text())["claudeAiOauth"]
    assert new["accessToken"] == standin.access_token != ACCESS
    assert new["refreshToken"] == standin.refresh_token != REFRESH
    audit = (m.dir(m.latest()["id"]) / "audit.jsonl").read_text()
    assert '"credential_refreshed"' in audit
    no_secret_anywhere(m, m.latest()["id"], ws,
                       {**SECRETS, "new access": standin.access_token,
                        "new refresh": standin.refresh_token})


@pytest.mark.one_engine
def test_a_failed_refresh_is_a_clear_error_and_leaves_the_host_file(m, standin, tmp_path):
    creds = grant_login(m, tmp_path, expires_in=-60)
    before = creds.read_bytes()
    standin.fail_refresh = True
    ws = m.workspace()
    out = claude(m, ws, "-p", "doomed")
    assert out.returncode != 0
    assert "MOAT-STANDIN-REPLY" not in out.stdout
    assert creds.read_bytes() == before
    audit = (m.dir(m.latest()["id"]) / "audit.jsonl").read_text()
    assert '"credential_refresh_failed"' in audit and "invalid_grant" in audit


@pytest.mark.one_engine
def test_without_an_anthropic_grant_it_says_moat_grant_anthropic(m):
    ws = m.workspace()
    out = claude(m, ws, "-p", "x")
    assert out.returncode != 0
    assert "moat grant anthropic" in out.stderr, out.stderr


@pytest.mark.one_engine
def test_a_wheel_that_is_not_the_pinned_one_is_refused(m, tmp_path):
    grant_key(m)
    bad = tmp_path / "claude_agent_sdk-0.2.189-py3-none-manylinux_2_17_x86_64.whl"
    bad.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    ws = m.workspace()
    out = m("claude", ws, "--image", IMAGE, "-p", "x", env={"MOAT_CLAUDE_WHEEL": str(bad)})
    assert out.returncode != 0
    assert "not that of the wheel pinned" in out.stderr, out.stderr
    out = m("claude", ws, "--image", IMAGE, "--claude-version", "0.0.1", "-p", "x",
            env={"MOAT_CLAUDE_WHEEL": ""})
    assert out.returncode != 0 and "not pinned" in out.stderr, out.stderr


def test_interactive_claude_through_a_pty(m, standin):
    grant_key(m)
    ws = m.workspace()
    env = {**m.env, "TERM": "xterm", "COLUMNS": "120", "LINES": "40"}
    # Build the image first so the terminal test waits only for Claude Code.
    assert claude(m, ws, "-p", "warm").returncode == 0
    t = Terminal(["claude", str(ws), "--image", IMAGE], env)
    # No onboarding, login, trust or key question: straight to the prompt.
    t.expect(b"/workspace", timeout=90)
    # One word: the terminal renderer moves the cursor between words.
    standin.reply = lambda body: "MOAT-INTERACTIVE-OK" if "hi" in json.dumps(body) else "?"
    # Type until Claude Code shows the text in its input box (the terminal
    # is raw, so only Claude Code draws it; keys it gets before its input
    # box reads them may be lost). Typed again at worst: the same words.
    t.send_until(b"please say hi moat-typed-7", b"moat-typed-7", timeout=90, every=5)
    # Enter, and again every few seconds until the reply shows (an Enter on
    # an empty input box, once the first went through, does nothing).
    t.send_until(b"\r", b"MOAT-INTERACTIVE-OK", timeout=90, every=5)
    for question in (b"Do you want to use this API key", b"trust the files", b"Choose the text style"):
        assert question not in t.out
    start = len(t.out)
    t.send(b"/exit")
    # Enter once the text is drawn, not in the same read as it (Claude Code
    # would take it for part of a paste). Should the renderer draw the word
    # in pieces, the cap keeps them apart anyway.
    t.seen(b"exit", 15, start)
    # Enter until Claude Code (and with it moat) exits: the first may only
    # pick `/exit` from the command menu the slash opened.
    deadline = time.time() + 60
    code = None
    while code is None and time.time() < deadline:
        try:
            t.send(b"\r")
        except OSError:
            pass  # moat has exited and closed the terminal
        code = t.poll(5)
    if code is None:
        code = t.wait(1)
    assert code == 0, t.out[-800:]


@pytest.mark.one_engine
def test_moat_claude_from_python_returns_a_run(m, standin, monkeypatch):
    import moat
    grant_key(m)
    ws = m.workspace()
    for key in ("MOAT_CLAUDE_WHEEL", "MOAT_UPSTREAM_CA_FILE", "MOAT_RESOLVE", "MOAT_KEYRING_BACKEND"):
        monkeypatch.setenv(key, m.env[key])
    r = moat.claude(ws, prompt="from python", image=IMAGE, home=str(m.home), timeout=240)
    assert r.exit_code == 0, r.stderr
    assert "MOAT-STANDIN-REPLY: from python" in r.output
    assert r.info()["agent"] == "claude"
    with pytest.raises(moat.InvalidArgumentError, match="needs a terminal"):
        moat.claude(ws, image=IMAGE, home=str(m.home))
    with pytest.raises(moat.InvalidArgumentError, match="not pinned"):
        monkeypatch.delenv("MOAT_CLAUDE_WHEEL")
        moat.claude(ws, prompt="x", version="0.0.1", image=IMAGE, home=str(m.home))


def test_a_running_session_holds_no_key_or_token_anywhere_inside(m, standin, tmp_path):
    """A detached interactive session, looked at from inside while it runs:
    its environment, every process's environment and command line, and
    Claude Code's files hold placeholders only."""
    grant_login(m, tmp_path)
    ws = m.workspace()
    out = m("claude", ws, "--image", IMAGE, "-d", "--name", "inside", timeout=240)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    assert m.wait_state(run_id, ("running",), timeout=60) == "running"
    container = m.meta(run_id)["container"]
    look = sh(ENGINE, "exec", "-u", m.meta(run_id)["user"], container, "sh", "-c",
              "env; for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ 2>/dev/null;"
              " tr '\\0' ' ' < $p/cmdline 2>/dev/null;"
              " echo; done; cat /home/.claude-moat/.credentials.json /home/.claude-moat/.claude.json;"
              " grep -rl . /home /tmp /etc/moat 2>/dev/null | head -1000 | xargs cat 2>/dev/null;"
              " true", timeout=60)
    # What the agent's user cannot read (the engine's own init under Podman)
    # the agent cannot read either.
    assert look.returncode == 0, look.stderr
    assert "CLAUDE_CONFIG_DIR=/home/.claude-moat" in look.stdout
    assert "sk-ant-oat01-moat-placeholder" in look.stdout
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in look.stdout, "the login is read from the file"
    for name, value in SECRETS.items():
        assert value not in look.stdout, f"the {name} is inside the container"
    # And the session is attachable: claude's screen is in its output.
    assert m.wait_log(run_id, "/workspace", timeout=60)
    m("stop", run_id, "-t", "1", check=True, timeout=60)
    no_secret_anywhere(m, run_id, ws)


@pytest.mark.one_engine
def test_a_state_file_that_is_not_json_is_kept_aside(m, standin):
    grant_key(m)
    ws = m.workspace()
    assert claude(m, ws, "-p", "one").returncode == 0
    state = next((m.home / "claude").iterdir())
    (state / ".claude.json").write_text("{not json")
    out = claude(m, ws, "-p", "two")
    assert out.returncode == 0, out.stderr
    assert "was not a JSON file" in out.stderr, out.stderr
    assert (state / ".claude.json.unreadable").read_text() == "{not json"
    assert json.loads((state / ".claude.json").read_text())["hasCompletedOnboarding"] is True
    # A link the agent left in its state directory (to a credential file of
    # the host's) is never followed: moved aside, nothing of its target read.
    host_secret = m.tmp / "host-credentials.json"
    host_secret.write_text(json.dumps({"refreshToken": "sk-ant-ort01-HOST-SECRET"}))
    (state / ".claude.json").unlink()
    (state / ".claude.json").symlink_to(host_secret)
    out = claude(m, ws, "-p", "three")
    assert out.returncode == 0, out.stderr
    assert "was not a JSON file" in out.stderr, out.stderr
    assert (state / ".claude.json.unreadable").is_symlink()
    assert not (state / ".claude.json").is_symlink()
    assert "HOST-SECRET" not in (state / ".claude.json").read_text()
    assert json.loads(host_secret.read_text()) == {"refreshToken": "sk-ant-ort01-HOST-SECRET"}
