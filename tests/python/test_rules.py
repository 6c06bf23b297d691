"""Request rules (network.rules) with real clients through moat.Proxy: git
push judged by ref against a local git smart-HTTP server (`git
http-backend`), and curl and Python for methods and paths, with the
normalisation tricks an agent would try. Nothing leaves loopback."""

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

import moat
from test_proxy_git import (BASIC, FILE_TEXT, clean_env, clone, git, github_cred, gitserver,  # noqa: F401
                            start)

IDENT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
         "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}

GIT_RULES = [{"github.com": [
    "allow GET /**",
    "allow POST /*/*/git-upload-pack",
    "allow git-push refs/heads/agent/**",
    "allow git-delete refs/heads/agent/tmp/**",
    "deny git-push **",
]}]


def bare_ref(server, tmp_path, ref):
    bare = os.path.join(server.server.project_root, "org", "repo.git")
    out = subprocess.run(["git", "--git-dir", bare, "rev-parse", "--verify", "-q", ref],
                         env=clean_env(str(tmp_path / "h")), capture_output=True, text=True)
    return out.stdout.strip() or None


def push(env, dest, *refspecs):
    return subprocess.run(["git", "push", "origin", *refspecs], env=env, cwd=dest,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def cloned(gitserver, tmp_path):
    """A strict proxy with the git rules and a clone with a new commit."""
    dest = tmp_path / "clone"
    with start(gitserver, tmp_path, credentials=[github_cred()], policy="strict",
               rules=GIT_RULES) as proxy:
        out, _ = clone(proxy, tmp_path, "https://github.com/org/repo.git", dest)
        assert out.returncode == 0, out.stderr
        env = {**clean_env(str(tmp_path / "client-home")), **proxy.env(), **IDENT}
        (dest / "new.txt").write_text("agent work\n")
        git("add", "new.txt", env=env, cwd=dest)
        git("commit", "-q", "-m", "agent", env=env, cwd=dest)
        head = git("rev-parse", "HEAD", env=env, cwd=dest).strip()
        yield proxy, env, dest, head


@pytest.mark.one_engine
def test_a_push_to_an_allowed_branch_goes_through(cloned, gitserver, tmp_path):
    proxy, env, dest, head = cloned
    out = push(env, dest, "HEAD:refs/heads/agent/feature")
    assert out.returncode == 0, out.stderr
    assert bare_ref(gitserver, tmp_path, "refs/heads/agent/feature") == head
    pushes = [r for r in proxy.trace() if r["url"].endswith("/git-receive-pack")]
    assert pushes and pushes[-1]["rule"] == "allow git-push refs/heads/agent/**", pushes
    assert pushes[-1]["status"] == 200


@pytest.mark.one_engine
def test_a_push_to_main_is_refused_in_gits_words_and_nothing_reaches_the_server(
        cloned, gitserver, tmp_path):
    proxy, env, dest, head = cloned
    before = bare_ref(gitserver, tmp_path, "refs/heads/main")
    seen_before = len(gitserver.seen)
    out = push(env, dest, "HEAD:main")
    assert out.returncode != 0
    assert "! [remote rejected] HEAD -> main (moat: deny git-push **)" in out.stderr, out.stderr
    assert bare_ref(gitserver, tmp_path, "refs/heads/main") == before
    receive = [r for r in gitserver.seen[seen_before:]
               if r["method"] == "POST" and r["path"].endswith("git-receive-pack")]
    assert receive == [], "nothing of the refused push reached the server"
    pushes = [r for r in proxy.trace() if r["url"].endswith("/git-receive-pack")]
    assert pushes[-1]["denied"].startswith("rule: denied: refs/heads/main"), pushes[-1]
    events = [e for e in proxy.audit_events() if e.get("type") == "policy_decision"
              and e.get("allowed") is False]
    assert any("refs/heads/main" in e["rule"] for e in events), events


@pytest.mark.one_engine
def test_a_push_mixing_allowed_and_denied_refs_is_refused_whole(cloned, gitserver, tmp_path):
    proxy, env, dest, head = cloned
    out = push(env, dest, "HEAD:refs/heads/agent/ok", "HEAD:refs/heads/release")
    assert out.returncode != 0
    assert "[remote rejected] HEAD -> agent/ok (moat: the push is refused whole" in out.stderr, \
        out.stderr
    assert "[remote rejected] HEAD -> release (moat: deny git-push **)" in out.stderr
    assert bare_ref(gitserver, tmp_path, "refs/heads/agent/ok") is None
    assert bare_ref(gitserver, tmp_path, "refs/heads/release") is None


@pytest.mark.one_engine
def test_deleting_is_judged_by_git_delete_rules(cloned, gitserver, tmp_path):
    proxy, env, dest, head = cloned
    assert push(env, dest, "HEAD:refs/heads/agent/keep", "HEAD:refs/heads/agent/tmp/x").returncode == 0
    # A branch git-push may update, but no git-delete rule lets it go.
    out = push(env, dest, ":refs/heads/agent/keep")
    assert out.returncode != 0
    assert "no git-delete rule for github.com matches it" in out.stderr, out.stderr
    assert bare_ref(gitserver, tmp_path, "refs/heads/agent/keep") == head
    out = push(env, dest, ":refs/heads/agent/tmp/x")
    assert out.returncode == 0, out.stderr
    assert bare_ref(gitserver, tmp_path, "refs/heads/agent/tmp/x") is None
    out = push(env, dest, ":main")
    assert out.returncode != 0 and bare_ref(gitserver, tmp_path, "refs/heads/main")


# ----------------------------------------------------------- methods and paths

PATH_RULES = [
    "pypi.test",
    {"github.com": [
        "deny * /org/*/admin/**",
        "allow GET /org/**",
        "allow POST /org/*/issues",
    ]},
]


@pytest.fixture
def paths_proxy(gitserver, tmp_path):
    with start(gitserver, tmp_path, policy="strict", rules=PATH_RULES) as proxy:
        yield proxy


def curl(proxy, *args):
    env = {**os.environ, **proxy.env()}
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "-o", "/dev/stderr",
                          "-w", "%{http_code}", *args], env=env, capture_output=True,
                         text=True, timeout=30)
    return int(out.stdout or 0), out.stderr


TRICKS = [
    "/org/repo.git/admin/x",
    "/org/repo.git/x/../admin/y",
    "/org/repo.git/%2e%2e/repo.git/admin/z",
    "/org/repo.git/%61dmin/q",
    "/ORG/repo.git/ADMIN/q",
    "/org//repo.git///admin/",
    "/org/repo.git/admin;jsessionid=1/x",
    "/org/repo.git/admin%2fx",
    "/org/repo.git/admin/",
    "/org/repo.git/%252e%252e/admin/x",
]


@pytest.mark.one_engine
@pytest.mark.parametrize("path", TRICKS)
def test_paths_an_agent_would_try_are_denied(paths_proxy, path):
    code, body = curl(paths_proxy, "--path-as-is", "https://github.com" + path)
    assert code == 403, (path, body)
    assert body.startswith("Moat: request blocked by network policy."), body


@pytest.mark.one_engine
@pytest.mark.parametrize("path", TRICKS)
def test_the_same_tricks_over_http2_are_denied(paths_proxy, path):
    """Inside the intercepted TLS the client speaks HTTP/2 (ALPN h2): the
    path comes in :path, and is judged as over HTTP/1.1."""
    env = {**os.environ, **paths_proxy.env()}
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--http2", "--path-as-is",
                          "-o", "/dev/stderr", "-w", "%{http_code} %{http_version}",
                          "https://github.com" + path], env=env, capture_output=True,
                         text=True, timeout=30)
    code, version = out.stdout.split()
    assert version == "2", f"curl spoke HTTP/{version}, not HTTP/2: {out.stderr}"
    assert code == "403", (path, out.stderr)
    assert out.stderr.startswith("Moat: request blocked by network policy."), out.stderr


@pytest.mark.one_engine
def test_http2_and_absolute_form_are_judged_alike(paths_proxy, gitserver):
    code, body = curl(paths_proxy, "--http2", "https://github.com/org/repo.git/admin/x")
    assert code == 403 and 'The rule "deny * /org/*/admin/**" for github.com denies it.' in body, body
    code, _ = curl(paths_proxy, "--http2", "https://github.com/org/repo.git/info/refs")
    assert code != 403
    # Plain HTTP, absolute-form through the proxy.
    code, body = curl(paths_proxy, "http://github.com/org/repo.git/admin/x")
    assert code == 403, body


@pytest.mark.one_engine
def test_methods_are_judged_and_no_match_falls_back_to_strict(paths_proxy):
    code, body = curl(paths_proxy, "-X", "DELETE", "https://github.com/org/repo.git/x")
    assert code == 403
    assert "No rule for github.com allows it" in body and 'like "allow DELETE /org/repo.git/x"' in body
    code, _ = curl(paths_proxy, "-X", "POST", "https://github.com/org/repo.git/issues")
    assert code != 403
    trace = paths_proxy.trace()
    judged = [r for r in trace if r["method"] in ("DELETE", "POST")]
    assert judged[0]["rule"] == "strict" and judged[0]["denied"] == "rule: strict", judged[0]
    assert judged[1]["rule"] == "allow POST /org/*/issues", judged[1]


@pytest.mark.one_engine
def test_every_decision_is_in_the_trace_and_the_audit_log_with_its_rule(gitserver, tmp_path):
    """Permissive mode on a host with rules: a request a deny rule matches
    is refused, one an allow rule matches goes, and one no rule matches
    falls back to the policy; the trace record and the audit entry of each
    name what decided."""
    with start(gitserver, tmp_path, rules=PATH_RULES) as proxy:
        assert curl(proxy, "https://github.com/org/repo.git/admin/x")[0] == 403
        assert curl(proxy, "https://github.com/org/repo.git/info/refs")[0] != 403
        assert curl(proxy, "-X", "DELETE", "https://github.com/org/repo.git/x")[0] != 403
        # A record is written when its response ends, which can be a moment
        # after curl has read it.
        deadline = time.time() + 10
        while True:
            trace = [r for r in proxy.trace() if r["method"] != "CONNECT"]
            if len(trace) >= 3 or time.time() > deadline:
                break
            time.sleep(0.05)
        assert [(r["method"], r.get("rule")) for r in trace] == [
            ("GET", "deny * /org/*/admin/**"),
            ("GET", "allow GET /org/**"),
            ("DELETE", "permissive"),
        ], trace
        decisions = [(e["rule"], e["allowed"]) for e in proxy.audit_events()
                     if e.get("type") == "policy_decision"]
        assert ("rule:deny * /org/*/admin/**", False) in decisions, decisions
        assert ("rule:allow GET /org/**", True) in decisions, decisions


@pytest.mark.one_engine
def test_python_clients_see_the_same(paths_proxy):
    env = paths_proxy.env()
    handler = urllib.request.ProxyHandler({"https": env["HTTPS_PROXY"]})
    import ssl
    ctx = ssl.create_default_context(cafile=paths_proxy.ca_cert_path)
    opener = urllib.request.build_opener(handler, urllib.request.HTTPSHandler(context=ctx))
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open("https://github.com/org/r/admin/settings", timeout=20)
    assert e.value.code == 403
    assert b"denies it" in e.value.read()


@pytest.mark.one_engine
def test_bad_rules_are_named():
    for rules, want in [
        (["not a host!"], "rules[0]"),
        ([{"github.com": ["allow GETT /x y"]}], "three words"),
        ([{"github.com": ["deny GET x"]}], "must start with /"),
        ([{"a.test": [], "b.test": []}], "one host per entry"),
        ([{"a.test": ["allow GET /**"]}, "b.test", {"A.test": ["deny * /**"]}],
         "rules[2]: a.test is listed twice (first as [0])"),
        ("github.com", "list"),
    ]:
        with pytest.raises(moat.InvalidArgumentError, match=re.escape(want)):
            moat.Proxy(rules=rules)


# ------------------------------------------------------------------ in a run

def test_git_rules_in_a_strict_run(gitserver, tmp_path):
    """agent.yaml's network.rules reach the run's proxy: inside the
    container, git clones, pushes its branch, and is refused main."""
    import base64
    from runhelp import IMAGE, TOKEN, Moat, require_docker
    require_docker()
    gitserver.server.expected_auth = "Basic " + base64.b64encode(
        f"x-access-token:{TOKEN}".encode()).decode()
    m = Moat(tmp_path / "moat")
    m.env["MOAT_UPSTREAM_CA_FILE"] = gitserver.ca
    m.env["MOAT_RESOLVE"] = f"github.com:443=127.0.0.1:{gitserver.port}"
    m.grant_github()
    try:
        yaml = ("network:\n  policy: strict\n  rules:\n    - github.com:\n"
                + "".join(f"        - {r}\n" for r in GIT_RULES[0]["github.com"]))
        ws = m.workspace(agent_yaml=yaml)
        script = (
            "set -e; cd /tmp; export HOME=/tmp GIT_AUTHOR_NAME=a GIT_AUTHOR_EMAIL=a@x "
            "GIT_COMMITTER_NAME=a GIT_COMMITTER_EMAIL=a@x; "
            "git clone -q https://github.com/org/repo.git r; cd r; "
            "echo x > x.txt; git add x.txt; git commit -qm x; "
            "git push -q origin HEAD:refs/heads/agent/run && echo PUSHED-AGENT; "
            "if git push origin HEAD:main 2>err.txt; then echo PUSHED-MAIN; fi; cat err.txt; "
            "git fetch -q origin && echo FETCHED; "
            "if git push origin :refs/heads/agent/run 2>del.txt; then echo DELETED; fi; cat del.txt; "
            "if git push origin HEAD:refs/heads/agent/two HEAD:refs/heads/release 2>mix.txt; "
            "then echo PUSHED-MIX; fi; cat mix.txt; "
            "git rev-parse HEAD")
        out = m.run(ws, "sh", "-c", script, args=["--grant", "github"], timeout=120)
        assert "PUSHED-AGENT" in out.stdout, out.stdout + out.stderr
        assert "PUSHED-MAIN" not in out.stdout
        assert "[remote rejected] HEAD -> main (moat: deny git-push **)" in out.stdout, out.stdout
        assert "FETCHED" in out.stdout
        assert "DELETED" not in out.stdout and "PUSHED-MIX" not in out.stdout
        assert "[remote rejected] agent/run (moat: no git-delete rule" in out.stdout, out.stdout
        assert "[remote rejected] HEAD -> release (moat: deny git-push **)" in out.stdout
        head = out.stdout.strip().splitlines()[-1]
        assert bare_ref(gitserver, tmp_path, "refs/heads/agent/run") == head
        assert bare_ref(gitserver, tmp_path, "refs/heads/main") != head
        assert bare_ref(gitserver, tmp_path, "refs/heads/agent/two") is None
        run = m.latest()
        trace = [json.loads(l) for l in (m.dir(run["id"]) / "network.jsonl").read_text().splitlines()]
        refused = [r for r in trace if (r.get("denied") or "").startswith("rule: denied: refs/heads/main")]
        assert len(refused) == 1, trace
        audit = (m.dir(run["id"]) / "audit.jsonl").read_text()
        assert "rule:allow git-push refs/heads/agent/**" in audit
    finally:
        m.cleanup()


# ----------------------------------------------------- policy check and suggest

def test_policy_check_and_suggest_from_a_runs_trace(tmp_path):
    """A permissive run's requests, replayed against a stricter agent.yaml
    (check lists what would now be denied, exit 1), and the policy suggest
    proposes (which, pasted in, lets all of them through again)."""
    from runhelp import Moat, make_upstream, require_docker
    require_docker()
    (tmp_path / "up").mkdir()
    upstream = make_upstream(tmp_path / "up")
    m = Moat(tmp_path / "moat", upstream)
    m.grant_github()
    try:
        ws = m.workspace()
        script = ("curl -s -o /dev/null https://api.github.com/repos/o/r; "
                  "curl -s -o /dev/null -X POST https://other.test/items; "
                  "curl -s -o /dev/null https://other.test/items/1")
        out = m.run(ws, "sh", "-c", script, args=["--grant", "github"])
        assert out.returncode == 0, out.stderr
        run_id = m.latest()["id"]
        (ws / "agent.yaml").write_text(
            "network:\n  policy: strict\n  rules:\n    - other.test:\n        - allow GET /**\n")
        out = m("policy", "check", run_id)
        assert out.returncode == 1, out.stderr
        assert "POST" in out.stdout and "https://other.test/items" in out.stdout, out.stdout
        report = json.loads(m("policy", "check", run_id, "--json").stdout)
        assert [(c["method"], c["now"], c["rule"]) for c in report["changes"]] == [
            ("POST", "denied", "strict")], report
        assert report["requests"] == 3
        # The grant's host stays allowed (grant:github), GET on other.test by the rule.
        suggestion = m("policy", "suggest", run_id, check=True).stdout
        assert "policy: strict" in suggestion and "allow POST /items" in suggestion, suggestion
        (ws / "agent.yaml").write_text(suggestion)
        assert m("config", ws).returncode == 0
        out = m("policy", "check", run_id)
        assert out.returncode == 0 and "would be decided as they were" in out.stderr, out
        # The same from Python.
        assert moat.policy_check(run_id, home=str(m.home))["changes"] == []
        assert moat.policy_suggest(run_id, home=str(m.home)) == suggestion
        with pytest.raises(moat.InvalidArgumentError, match="no run matches"):
            moat.policy_check("nope", home=str(m.home))
    finally:
        m.cleanup()
        upstream.close()


def test_policy_check_lists_what_would_now_be_allowed(tmp_path):
    """A strict run whose POST a rule denied, replayed after agent.yaml
    allows it: the CLI, Python and its --json say it would now be allowed,
    and by which rule."""
    from runhelp import Moat, make_upstream, require_docker
    require_docker()
    (tmp_path / "up").mkdir()
    upstream = make_upstream(tmp_path / "up")
    m = Moat(tmp_path / "moat", upstream)
    try:
        ws = m.workspace(agent_yaml=(
            "network:\n  policy: strict\n  rules:\n"
            "    - other.test:\n        - allow GET /**\n"))
        script = ("curl -s -o /dev/null https://other.test/items/1; "
                  "curl -s -o /dev/null -X POST https://other.test/items")
        out = m.run(ws, "sh", "-c", script)
        assert out.returncode == 0, out.stderr
        run_id = m.latest()["id"]
        out = m("policy", "check", run_id)
        assert out.returncode == 0, (out.stdout, out.stderr)
        (ws / "agent.yaml").write_text(
            "network:\n  policy: strict\n  rules:\n"
            "    - other.test:\n        - allow GET /**\n        - allow POST /items\n")
        out = m("policy", "check", run_id)
        # Listed, and exit 0: nothing the run did would now be denied.
        assert out.returncode == 0, out.stderr
        assert "1 of 2 requests" in out.stderr, out.stderr
        line = [x for x in out.stdout.splitlines() if "POST" in x]
        assert line and line[0].split()[:2] == ["denied", "allowed"], out.stdout
        report = json.loads(m("policy", "check", run_id, "--json").stdout)
        assert [(c["method"], c["then"], c["now"], c["rule"]) for c in report["changes"]] == [
            ("POST", "denied", "allowed", "allow POST /items")], report
        assert moat.policy_check(run_id, home=str(m.home))["changes"] == report["changes"]
    finally:
        m.cleanup()
        upstream.close()


@pytest.mark.one_engine
def test_a_raw_tunnel_cannot_carry_requests_past_the_rules(gitserver, tmp_path):
    """Plain HTTP through CONNECT (curl --proxytunnel) to a host with rules,
    in permissive mode: refused, since the rules would never see it."""
    with start(gitserver, tmp_path, rules=PATH_RULES) as proxy:
        code, body = curl(proxy, "--proxytunnel", "http://github.com/org/repo.git/admin/x")
        assert code == 403, body
        assert "has request rules" in body, body
        events = [e for e in proxy.audit_events() if e.get("type") == "policy_decision"]
        assert any(e["rule"] == "rules: raw tunnel" and not e["allowed"] for e in events), events
