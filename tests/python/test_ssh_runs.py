"""SSH inside runs, end to end: `ssh:` grants, the filtering SSH agent the
run's supervisor serves at /run/moat/ssh/agent.sock, the per-run forwarders
to the granted hosts, and what the audit log and the network trace say.

Real pieces only: the real `moat` binary and Python module, the Docker
engine with moat-test:bookworm, a real ssh-agent (keys A and B, made by
ssh-keygen) and real OpenSSH servers (/usr/sbin/sshd) with their own host
keys, a git repository behind each, and root login allowed for BOTH keys,
so every refusal seen here is the filtering agent's doing, not a server's.

No traffic leaves this host. `git-a.test` and `git-b.test` exist nowhere:
the operator setting MOAT_RESOLVE maps them to the servers on 127.0.0.1.
The non-granted server (git-b) also listens on this host's other addresses,
so that a permissive run can reach it directly at its network's gateway.
Container scripts check that moat's ssh configuration is there before they
run ssh, so that a missing one never makes ssh look the fake names up in
DNS."""

import base64
import json
import os
import pathlib
import socket

import pytest

import moat
from runhelp import ENGINE, IMAGE, Moat, gateway_of, require_docker, sh
from sshhelp import (Key, agent, fresh_agent, known_hosts_line, private_key_needles,  # noqa: F401
                     require_ssh, sshd, write_known_hosts)

require_docker()
require_ssh()

SOCK_INSIDE = "/run/moat/ssh/agent.sock"
HELLO_A = "hello from git-a as root"
HELLO_B = "hello from git-b as root"
STRICT_YAML = "network:\n  policy: strict\n"

# Fails a container script early (exit 3) when moat's ssh configuration for
# git-a.test is absent, so that ssh never resolves the fake name.
GUARD = ("grep -qs 'git-a.test' /etc/ssh/ssh_config.d/moat.conf || "
         "{ echo NO-MOAT-SSH-CONFIG; ls -la /etc/ssh/ssh_config.d /run/moat 2>&1; exit 3; }\n")
SSH = "ssh -o BatchMode=yes -o ConnectTimeout=15"


def script(text, **values):
    """A container script: @SSH@ is the ssh command, @NAME@ the given values."""
    text = text.replace("@SSH@", SSH)
    for k, v in values.items():
        text = text.replace(f"@{k.upper()}@", str(v))
    return GUARD + text


# Fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(sshd):
    """(git-a, git-b): git-a on 127.0.0.1 only; git-b, never granted unless a
    test says so, on every address of this host."""
    return sshd("git-a"), sshd("git-b", listen="0.0.0.0")


@pytest.fixture(scope="module")
def stranger_keys(tmp_path_factory):
    """Two public keys that are nobody's host key here: one for a @revoked
    line, one for an unrelated host."""
    d = tmp_path_factory.mktemp("stranger")
    return Key(d, "revoked", "revoked@test"), Key(d, "other", "other@test")


def resolve(*pairs):
    return ",".join(f"{host}:22={server.address}" for host, server in pairs)


@pytest.fixture
def m(tmp_path, agent, servers):
    """A moat home; the CLI's environment has a fake HOME (for known_hosts),
    the shared agent and MOAT_RESOLVE for git-a.test and git-b.test."""
    a, b = servers
    moat_ = Moat(tmp_path)
    moat_.user_home = tmp_path / "user"
    moat_.user_home.mkdir()
    moat_.env.update({"HOME": str(moat_.user_home), "SSH_AUTH_SOCK": str(agent.sock),
                      "MOAT_RESOLVE": resolve(("git-a.test", a), ("git-b.test", b))})
    yield moat_
    moat_.cleanup()


def grant(m, host="git-a.test", key=None, known=None, check=True):
    """Writes the fake HOME's known_hosts (when `known` is given) and runs
    `moat grant ssh --host HOST [--key FP]`."""
    if known is not None:
        write_known_hosts(m.user_home, known)
    args = ["grant", "ssh", "--host", host] + (["--key", key] if key else [])
    return m(*args, check=check)


def default_known(servers):
    a, b = servers
    return [known_hosts_line("git-a.test", a), known_hosts_line("git-b.test", b)]


def put(ws, name, text, mode=0o600):
    p = ws / name
    p.write_text(text)
    os.chmod(p, mode)
    os.chown(p, 1000, 1000)
    return p


def sections(stdout):
    """The container scripts print `=== name` before each part."""
    out, name = {}, None
    for line in stdout.splitlines():
        if line.startswith("=== "):
            name = line[4:].strip()
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def audit_entries(m, run_id):
    return [json.loads(l) for l in (m.dir(run_id) / "audit.jsonl").read_text().splitlines()]


def ssh_events(m, run_id):
    return [e["data"] for e in audit_entries(m, run_id) if e["type"] == "ssh_agent"]


def allowed_signs(events):
    return [(e.get("host"), e.get("fingerprint")) for e in events
            if e.get("op") == "sign" and e.get("allowed") is True]


def refused(events, op=None):
    return [e for e in events if e.get("allowed") is False and (op is None or e.get("op") == op)]


def trace(m, run_id):
    out = m("trace", run_id, "--network", "--json", check=True)
    return [json.loads(l) for l in out.stdout.splitlines() if l.strip()]


def keys_listed(text):
    """The base64 key bodies of `ssh-add -L` output."""
    return [l.split()[1] for l in text.splitlines() if l.startswith(("ssh-", "ecdsa-", "sk-"))]


def ssh_g(text):
    """`ssh -G` output as {option: [values]}."""
    opts = {}
    for line in text.splitlines():
        if " " in line:
            k, v = line.split(" ", 1)
            opts.setdefault(k.lower(), []).append(v)
    return opts


# Grants and known_hosts ----------------------------------------------------------------

def test_grant_without_a_known_host_key_warns_but_grants(m, agent):
    out = grant(m, known=[])
    assert out.returncode == 0, out.stderr
    assert "known_hosts" in out.stderr, out.stderr
    assert "Granted SSH access to git-a.test" in out.stderr
    listed = json.loads(m("grant", "list", "--json", check=True).stdout)
    [g] = [g for g in listed if g["provider"] == "ssh:git-a.test"]
    assert g["metadata"]["fingerprint"] == agent.a.fingerprint


@pytest.mark.parametrize("form", ["plain", "list", "bracket", "hashed"])
def test_known_hosts_forms_give_the_run_the_host_key(m, servers, stranger_keys, form):
    """The grant (and the run) take git-a.test's key from known_hosts written
    as `host`, in a list `other,host`, as `[host]:22` or hashed `|1|...`;
    @revoked keys and other hosts' keys stay out of the run's known hosts."""
    a, _ = servers
    revoked, other = stranger_keys
    known = [
        "# a comment, then a blank line",
        "",
        known_hosts_line("git-c.test", other.pub),
        known_hosts_line("git-a.test", revoked.pub, form=form, marker="@revoked"),
        known_hosts_line("git-a.test", a, form=form),
    ]
    out = grant(m, known=known)
    assert out.returncode == 0, out.stderr
    ws = m.workspace()
    out = m.run(ws, "sh", "-c", GUARD + "echo '=== known'; cat /etc/moat/ssh_known_hosts; "
                f"echo '=== login'; {SSH} root@git-a.test whoami",
                args=["--grant", "ssh:git-a.test"])
    part = sections(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert part["login"].strip() == HELLO_A, out.stdout + out.stderr
    known_inside = part["known"]
    assert a.host_b64 in known_inside, known_inside
    assert revoked.b64 not in known_inside, "a @revoked key is trusted inside the run"
    assert other.b64 not in known_inside, "another host's key is in the run's known hosts"
    for line in known_inside.splitlines():
        if a.host_b64 in line:
            assert not line.startswith("@revoked"), line


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_rsa_and_ecdsa_host_keys_are_verified(m, sshd, agent, kind):
    """The session binding is signed by the server's host key: an RSA or
    ECDSA host key works as well as ed25519."""
    server = sshd(f"git-{kind}", host_key_type=kind)
    m.env["MOAT_RESOLVE"] = resolve(("git-a.test", server))
    grant(m, known=[known_hosts_line("git-a.test", server)], check=True)
    mark = server.mark()
    out = m.run(m.workspace(), "sh", "-c", GUARD + f"{SSH} root@git-a.test whoami",
                args=["--grant", "ssh:git-a.test"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"hello from git-{kind} as root"
    assert server.accepted(mark) == [agent.a.fingerprint]
    assert ("git-a.test", agent.a.fingerprint) in allowed_signs(ssh_events(m, m.latest()["id"]))


# The main path: ssh, git clone and push, listing, audit, trace ------------------------------

HAPPY = r'''
echo "=== sock"; echo "$SSH_AUTH_SOCK"
echo "=== ssh -G git-a.test"; ssh -G git-a.test
echo "=== ssh -G git-b.test"; ssh -G git-b.test
echo "=== known"; cat /etc/moat/ssh_known_hosts
echo "=== list"; ssh-add -L; echo "exit=$?"
echo "=== login"; @SSH@ root@git-a.test whoami; echo "exit=$?"
echo "=== clone"
cd /tmp && git clone -q root@git-a.test:repo.git clone && cat /tmp/clone/README; echo "exit=$?"
echo "=== push"
cd /tmp/clone && echo pushed > pushed.txt && git add pushed.txt &&
  git -c user.name=agent -c user.email=agent@test commit -q -m "pushed from the run" &&
  git push -q origin main; echo "exit=$?"
'''


def test_ssh_git_clone_and_push_through_the_filtering_agent(m, servers, agent):
    a, b = servers
    grant(m, known=default_known(servers), check=True)
    mark_a, mark_b = a.mark(), b.mark()
    commands = a.command_count()
    ws = m.workspace()
    out = m.run(ws, "sh", "-c", script(HAPPY), args=["--grant", "ssh:git-a.test"], timeout=120)
    part = sections(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = m.latest()["id"]
    gw = gateway_of(m.meta(run_id))

    assert part["sock"].strip() == SOCK_INSIDE
    # The granted host goes to a forwarder on the run's gateway, under its
    # own name for host key checking; the other host is not mapped.
    cfg = ssh_g(part["ssh -G git-a.test"])
    assert cfg["hostname"] == [gw], cfg.get("hostname")
    assert 0 < int(cfg["port"][0]) < 65536, cfg["port"]
    assert cfg.get("hostkeyalias") == ["git-a.test"], cfg.get("hostkeyalias")
    assert any("/etc/moat/ssh_known_hosts" in v for v in cfg.get("globalknownhostsfile", [])), cfg
    other = ssh_g(part["ssh -G git-b.test"])
    assert other["hostname"] == ["git-b.test"], "a host that was not granted is mapped"
    assert "hostkeyalias" not in other
    assert a.host_b64 in part["known"] and b.host_b64 not in part["known"], part["known"]
    # Only the granted key is listed.
    assert keys_listed(part["list"]) == [agent.a.b64], part["list"]
    assert agent.b.b64 not in out.stdout
    # ssh, git clone and git push all worked, with key A, on git-a.
    assert part["login"].splitlines() == [HELLO_A, "exit=0"], out.stdout + out.stderr
    assert part["clone"].splitlines() == [a.repo_marker, "exit=0"], out.stdout + out.stderr
    assert part["push"].splitlines() == ["exit=0"], out.stdout + out.stderr
    assert "pushed from the run" in a.bare_log()
    assert a.commands_since(commands) == ["whoami", "git-upload-pack 'repo.git'",
                                          "git-receive-pack 'repo.git'"]
    assert a.accepted(mark_a) == [agent.a.fingerprint] * 3, a.log_since(mark_a)
    assert "Connection from" not in b.log_since(mark_b)

    # Audit: listed, three signatures for git-a.test with key A, nothing refused.
    events = ssh_events(m, run_id)
    assert any(e.get("op") == "list" and e.get("allowed") is True for e in events), events
    signs = allowed_signs(events)
    assert len(signs) >= 3 and set(signs) == {("git-a.test", agent.a.fingerprint)}, events
    assert refused(events) == [], events
    assert any(e.get("op") == "bind" for e in events), events
    assert all(isinstance(e.get("allowed"), bool) for e in events), events
    verify = m("audit", run_id, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # The trace has the ssh connections.
    records = trace(m, run_id)
    ssh_records = [r for r in records if r.get("method") == "SSH"]
    assert ssh_records, records
    assert {(r["host"], r["port"]) for r in ssh_records} == {("git-a.test", 22)}, ssh_records
    # Nothing secret or private left the host agent: no key material in the
    # run's files either.
    needles = [n for k in agent.keys for _, n in private_key_needles(k)]
    for f in ("run.json", "logs.jsonl", "network.jsonl", "audit.jsonl", "supervisor.log"):
        p = m.dir(run_id) / f
        if p.exists():
            data = p.read_bytes()
            assert not [n for n in needles if n in data], f"private key material in {f}"


STRICT = r'''
gw=$(ip route | awk '/^default/ {print $3}')
echo "=== gw"; echo "$gw"
echo "=== login"; @SSH@ root@git-a.test whoami; echo "exit=$?"
echo "=== ls-remote"; git ls-remote root@git-a.test:repo.git; echo "exit=$?"
echo "=== direct-b"
nc -z -w 3 "$gw" @PORT_B@; echo "nc=$?"
ssh -o BatchMode=yes -o ConnectTimeout=4 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p @PORT_B@ "root@$gw" whoami; echo "exit=$?"
'''


def test_strict_mode_ssh_to_the_granted_host_only(m, servers, agent):
    a, b = servers
    grant(m, known=default_known(servers), check=True)
    mark_a, mark_b = a.mark(), b.mark()
    ws = m.workspace(agent_yaml=STRICT_YAML)
    out = m.run(ws, "sh", "-c", script(STRICT, port_b=b.port),
                args=["--grant", "ssh:git-a.test"], timeout=120)
    part = sections(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = m.latest()["id"]
    assert m.meta(run_id)["policy"] == "strict"
    assert part["gw"].strip() == gateway_of(m.meta(run_id)), part["gw"]
    assert part["login"].splitlines() == [HELLO_A, "exit=0"], out.stdout + out.stderr
    assert "refs/heads/main" in part["ls-remote"] and part["ls-remote"].endswith("exit=0"), \
        out.stdout + out.stderr
    direct = part["direct-b"].splitlines()
    assert direct[0] != "nc=0", "strict mode let the run reach a host port directly"
    assert direct[-1] != "exit=0" and HELLO_B not in out.stdout
    assert "Connection from" not in b.log_since(mark_b)
    assert a.accepted(mark_a) == [agent.a.fingerprint] * 2
    assert set(allowed_signs(ssh_events(m, run_id))) == {("git-a.test", agent.a.fingerprint)}
    assert [r for r in trace(m, run_id) if r.get("method") == "SSH" and r["host"] == "git-a.test"]


# Refusals ----------------------------------------------------------------------------

NOT_GRANTED = r'''
gw=$(ip route | awk '/^default/ {print $3}')
echo "=== gw"; echo "$gw"
B="-p @PORT_B@ -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
echo "=== reach"; nc -z -w 5 "$gw" @PORT_B@; echo "nc=$?"
echo "=== b"; @SSH@ $B "root@$gw" whoami; echo "exit=$?"
echo "=== b with key a"; @SSH@ $B -o IdentitiesOnly=yes -i /workspace/a.pub "root@$gw" whoami; echo "exit=$?"
echo "=== b as git-a"; @SSH@ $B -o HostKeyAlias=git-a.test "root@$gw" whoami; echo "exit=$?"
'''


def test_the_agent_refuses_to_sign_for_a_host_that_is_not_granted(m, servers, agent):
    """Permissive mode: the run reaches git-b (not granted, but accepting key
    A) directly at the gateway. The filtering agent refuses to sign, because
    git-b's host key is no granted host's key."""
    a, b = servers
    grant(m, known=default_known(servers), check=True)
    ws = m.workspace()
    put(ws, "a.pub", agent.a.pub + "\n")
    mark_b = b.mark()
    out = m.run(ws, "sh", "-c", script(NOT_GRANTED, port_b=b.port),
                args=["--grant", "ssh:git-a.test"], timeout=120)
    part = sections(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert part["gw"].strip() == gateway_of(m.latest()), part["gw"]
    assert part["reach"].strip() == "nc=0", "the control failed: git-b is not reachable"
    for name in ("b", "b with key a", "b as git-a"):
        lines = part[name].splitlines()
        assert lines[-1] == "exit=255", (name, out.stdout, out.stderr)
        assert HELLO_B not in part[name]
    assert out.stderr.count("Permission denied (publickey)") >= 3, out.stderr
    # moat says why, once, in the run's output (ssh only says "denied").
    told = [l for l in out.stderr.splitlines()
            if l.startswith("moat: the run's SSH agent refused to sign: ")]
    assert len(told) == 1, out.stderr
    assert "is not a known key of a host this key is granted for" in told[0], told
    assert "Accepted publickey" not in b.log_since(mark_b), b.log_since(mark_b)
    run_id = m.latest()["id"]
    events = ssh_events(m, run_id)
    assert allowed_signs(events) == [], events
    signs = refused(events, "sign")
    assert signs, events
    assert all(e.get("host") != "git-a.test" for e in signs), signs
    assert m("audit", run_id, timeout=60).returncode == 0
    # Control: git-b does let key A in, so the refusal was the agent's.
    control = b.login(agent.a)
    assert control.stdout.strip() == HELLO_B, control.stdout + control.stderr


BOTH = r'''
echo "=== list"; ssh-add -L; echo "exit=$?"
echo "=== a"; @SSH@ root@git-a.test whoami; echo "exit=$?"
echo "=== b"; @SSH@ root@git-b.test whoami; echo "exit=$?"
echo "=== a with key b"; @SSH@ -o IdentitiesOnly=yes -i /workspace/b.pub root@git-a.test whoami; echo "exit=$?"
echo "=== b with key a"; @SSH@ -o IdentitiesOnly=yes -i /workspace/a.pub root@git-b.test whoami; echo "exit=$?"
'''


def test_each_host_gets_only_the_key_granted_for_it(m, servers, agent):
    """A for git-a.test, B for git-b.test: both servers accept both keys, yet
    git-a only ever sees A and git-b only B."""
    a, b = servers
    grant(m, known=default_known(servers), check=True)
    grant(m, host="git-b.test", key=agent.b.fingerprint, check=True)
    ws = m.workspace()
    put(ws, "a.pub", agent.a.pub + "\n")
    put(ws, "b.pub", agent.b.pub + "\n")
    mark_a, mark_b = a.mark(), b.mark()
    out = m.run(ws, "sh", "-c", script(BOTH),
                args=["--grant", "ssh:git-a.test,ssh:git-b.test"], timeout=120)
    part = sections(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(keys_listed(part["list"])) == sorted([agent.a.b64, agent.b.b64]), part["list"]
    assert part["a"].splitlines() == [HELLO_A, "exit=0"], out.stdout + out.stderr
    assert part["b"].splitlines() == [HELLO_B, "exit=0"], out.stdout + out.stderr
    assert part["a with key b"].splitlines()[-1] == "exit=255", out.stdout + out.stderr
    assert part["b with key a"].splitlines()[-1] == "exit=255", out.stdout + out.stderr
    assert a.accepted(mark_a) == [agent.a.fingerprint], a.log_since(mark_a)
    assert b.accepted(mark_b) == [agent.b.fingerprint], b.log_since(mark_b)
    events = ssh_events(m, m.latest()["id"])
    signs = allowed_signs(events)
    assert set(signs) == {("git-a.test", agent.a.fingerprint),
                          ("git-b.test", agent.b.fingerprint)}, events
    wrong = [(e.get("host"), e.get("fingerprint")) for e in refused(events, "sign")]
    assert ("git-a.test", agent.b.fingerprint) in wrong, events
    assert ("git-b.test", agent.a.fingerprint) in wrong, events
    ssh_records = {(r["host"], r["port"]) for r in trace(m, m.latest()["id"])
                   if r.get("method") == "SSH"}
    assert ssh_records == {("git-a.test", 22), ("git-b.test", 22)}, ssh_records
    # Control: each server lets either key in, so the refusals were the agent's.
    for server in (a, b):
        for key in agent.keys:
            login = server.login(key)
            assert login.stdout.strip() == f"hello from {server.name} as root", \
                (server.name, key.name, login.stderr)


CHANGE = r'''
cat > /tmp/askpass <<'EOF'
#!/bin/sh
echo lock-password
EOF
chmod +x /tmp/askpass
ask() { SSH_ASKPASS=/tmp/askpass SSH_ASKPASS_REQUIRE=force DISPLAY=:0 "$@" </dev/null; }
ssh-keygen -q -t ed25519 -N '' -C evil@test -f /tmp/evil
echo "=== before"; ssh-add -L
echo "=== codes"
ssh-add /tmp/evil; echo "add=$?"
ssh-add -t 600 /tmp/evil; echo "add-constrained=$?"
ssh-add -d /workspace/a.pub; echo "remove=$?"
ssh-add -D; echo "remove-all=$?"
ask ssh-add -x; echo "lock=$?"
ask ssh-add -X; echo "unlock=$?"
echo "=== after"; ssh-add -L; echo "exit=$?"
'''


def test_the_agent_refuses_every_change_to_the_keys(m, servers, fresh_agent):
    """ssh-add of a new key (plain and constrained), -d, -D, -x (lock) and -X
    (unlock) are all refused; the user's agent still holds both keys,
    unlocked, and nothing new."""
    m.env["SSH_AUTH_SOCK"] = str(fresh_agent.sock)
    grant(m, known=default_known(servers), check=True)
    ws = m.workspace()
    put(ws, "a.pub", fresh_agent.a.pub + "\n")
    out = m.run(ws, "sh", "-c", CHANGE, args=["--grant", "ssh:git-a.test"], timeout=120)
    part = sections(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert keys_listed(part["before"]) == [fresh_agent.a.b64], part["before"]
    codes = dict(l.split("=", 1) for l in part["codes"].splitlines() if "=" in l)
    assert set(codes) == {"add", "add-constrained", "remove", "remove-all", "lock", "unlock"}, codes
    assert {k: v for k, v in codes.items() if v == "0"} == {}, out.stdout + out.stderr
    assert keys_listed(part["after"]) == [fresh_agent.a.b64], part["after"]
    # The user's agent, seen from the host: unchanged and unlocked.
    listing = fresh_agent.listing()
    assert listing.returncode == 0, "the host agent is locked or empty: " + listing.stdout
    assert fresh_agent.fingerprints() == [fresh_agent.a.fingerprint, fresh_agent.b.fingerprint]
    events = ssh_events(m, m.latest()["id"])
    ops = {e.get("op") for e in refused(events)}
    for op in ("add_identity", "remove_identity", "remove_all_identities", "lock"):
        assert op in ops, (op, events)
    assert [e for e in events if e.get("allowed") is True
            and e.get("op") not in ("list", "sign", "bind")] == [], events


# What the container can see -------------------------------------------------------------

SCAN = r'''
import json, os, stat, sys
needles = {name: bytes.fromhex(a + b) for name, a, b in PIECES}
found, sockets, files = [], [], 0

def check(where, data):
    for name, n in needles.items():
        if n in data:
            found.append(f"{name} in {where}")

for pid in os.listdir("/proc"):
    if pid.isdigit() or pid == "self":
        for f in ("environ", "cmdline", "mountinfo"):
            try:
                check(f"/proc/{pid}/{f}", open(f"/proc/{pid}/{f}", "rb").read())
            except OSError:
                pass
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for n in names + [d for d in dirs]:
        p = os.path.join(root, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            sockets.append(p)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
            continue
        try:
            with open(p, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        files += 1
        check(p, data)
writes = {}
for what, fn in (("create", lambda: open("/run/moat/ssh/x", "w").close()),
                 ("unlink", lambda: os.unlink("/run/moat/ssh/agent.sock")),
                 ("chmod", lambda: os.chmod("/run/moat/ssh/agent.sock", 0o777))):
    try:
        fn()
        writes[what] = "done"
    except OSError as e:
        writes[what] = f"refused: {e.strerror}"
mounts = [l.split()[4] for l in open("/proc/self/mountinfo")]
print("SCAN " + json.dumps({"found": found, "sockets": sorted(sockets), "files": files,
                            "writes": writes, "mounts": mounts,
                            "sock": os.environ.get("SSH_AUTH_SOCK")}))
'''


def halves(name, secret: bytes):
    h = secret.hex()
    return (name, h[:len(h) // 2], h[len(h) // 2:])


def test_no_private_key_nor_host_agent_socket_inside(m, servers, agent):
    grant(m, known=default_known(servers), check=True)
    needles = [n for k in agent.keys for n in private_key_needles(k)]
    needles += [("host agent socket path", str(agent.sock).encode()),
                ("host agent directory", str(agent.sock.parent).encode())]
    ws = m.workspace()
    put(ws, "scan.py", f"PIECES = {[halves(n, v) for n, v in needles]!r}\n" + SCAN)
    out = m.run(ws, "sh", "-c", "timeout 150 python3 /workspace/scan.py",
                args=["--grant", "ssh:git-a.test"], timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [line] = [l for l in out.stdout.splitlines() if l.startswith("SCAN ")]
    scan = json.loads(line[5:])
    assert scan["sock"] == SOCK_INSIDE
    assert scan["found"] == [], scan["found"]
    assert scan["files"] > 1000, "the scan did not walk the file system"
    assert scan["sockets"] == [SOCK_INSIDE], scan["sockets"]
    assert "/run/moat/ssh" in scan["mounts"], scan["mounts"]
    for what, result in scan["writes"].items():
        assert result.startswith("refused"), (what, result)


AGENT_PROTOCOL = r'''
import json, os, socket, struct, subprocess, sys, threading

cfg = json.loads(sys.argv[1])
SOCK = os.environ["SSH_AUTH_SOCK"]
FAILURE, SUCCESS, REQUEST_IDENTITIES, IDENTITIES_ANSWER = 5, 6, 11, 12
SIGN_REQUEST, SIGN_RESPONSE, EXTENSION = 13, 14, 27
b64 = lambda s: __import__("base64").b64decode(s)
KEY_B, HOST_A, HOST_B = b64(cfg["key_b"]), b64(cfg["host_a"]), b64(cfg["host_b"])
r = {}


def s(b):
    return struct.pack(">I", len(b)) + b


def frame(t, body=b""):
    return struct.pack(">I", 1 + len(body)) + bytes([t]) + body


def recv_exact(sk, n):
    buf = b""
    while len(buf) < n:
        chunk = sk.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return buf


def read_msg(sk):
    n = struct.unpack(">I", recv_exact(sk, 4))[0]
    return recv_exact(sk, n)


class Conn:
    def __init__(self, path=SOCK):
        self.sk = socket.socket(socket.AF_UNIX)
        self.sk.settimeout(10)
        self.sk.connect(path)

    def send_raw(self, data):
        self.sk.sendall(data)
        try:
            msg = read_msg(self.sk)
        except socket.timeout:
            return "no answer"
        except (EOFError, OSError):
            return "closed"
        return msg[0] if msg else "empty"

    def ask(self, t, body=b""):
        return self.send_raw(frame(t, body))

    def identities(self):
        self.sk.sendall(frame(REQUEST_IDENTITIES))
        msg = read_msg(self.sk)
        assert msg[0] == IDENTITIES_ANSWER, msg[0]
        n, at, keys = struct.unpack(">I", msg[1:5])[0], 5, []
        for _ in range(n):
            blob, at = string(msg, at)
            _, at = string(msg, at)
            keys.append(blob)
        return keys

    def close(self):
        self.sk.close()


def string(buf, at):
    n = struct.unpack(">I", buf[at:at + 4])[0]
    return buf[at + 4:at + 4 + n], at + 4 + n


def sign(key, data, flags=0):
    return SIGN_REQUEST, s(key) + s(data) + struct.pack(">I", flags)


def userauth(session_id, key, user=b"root"):
    alg, _ = string(key, 0)
    return (s(session_id) + bytes([50]) + s(user) + s(b"ssh-connection") + s(b"publickey")
            + b"\x01" + s(alg) + s(key))


def bind(host_key, session_id, signature, forwarding=0):
    return EXTENSION, (s(b"session-bind@openssh.com") + s(host_key) + s(session_id)
                       + s(signature) + bytes([forwarding]))


BOGUS_SIG = s(b"ssh-ed25519") + s(b"\x00" * 64)

# 1. Listing and signing with no session bound.
c = Conn()
keys = c.identities()
r["listed"] = [__import__("base64").b64encode(k).decode() for k in keys]
KEY_A = keys[0]
r["sign arbitrary data"] = c.ask(*sign(KEY_A, b"arbitrary data to sign"))
r["sign userauth, no bind"] = c.ask(*sign(KEY_A, userauth(os.urandom(32), KEY_A)))
r["sign rsa-sha2-512 flag"] = c.ask(*sign(KEY_A, b"more data", 4))
r["sign with key b"] = c.ask(*sign(KEY_B, userauth(os.urandom(32), KEY_B)))
r["unknown request 200"] = c.ask(200, b"\x00\x00\x00\x00")
r["unknown request 0"] = c.ask(0)
r["unknown extension"] = c.ask(EXTENSION, s(b"nonsense@example.com") + s(b"x"))
r["listing after the unknown ones"] = len(c.identities())
# 2. Bogus session binds: git-a's and git-b's host keys, bad signatures.
sid = os.urandom(32)
r["bind git-a, bogus signature"] = c.ask(*bind(HOST_A, sid, BOGUS_SIG))
r["sign after bogus bind"] = c.ask(*sign(KEY_A, userauth(sid, KEY_A)))
r["bind git-b, bogus signature"] = c.ask(*bind(HOST_B, sid, BOGUS_SIG))
r["bind truncated"] = c.ask(EXTENSION, s(b"session-bind@openssh.com") + s(HOST_A))
r["listing after the binds"] = len(c.identities())
c.close()
# 3. Malformed frames: a huge length, then a zero length.
c = Conn()
r["huge frame"] = c.send_raw(struct.pack(">I", 0x7FFFFFF0) + b"\x0b" + b"\x00" * 64)
c.close()
c = Conn()
r["empty frame"] = c.send_raw(struct.pack(">I", 0))
c.close()
r["listing on a new connection"] = len(Conn().identities())

# 4. Record a real login to git-a through a relay, then replay its pieces.
relay_path = "/tmp/relay.sock"
log = []
srv = socket.socket(socket.AF_UNIX)
srv.bind(relay_path)
srv.listen(4)


def relay(cl):
    up = socket.socket(socket.AF_UNIX)
    up.connect(SOCK)
    try:
        while True:
            req = read_msg(cl)
            up.sendall(s(req))
            resp = read_msg(up)
            log.append((req, resp))
            cl.sendall(s(resp))
    except (EOFError, OSError):
        pass
    finally:
        cl.close()
        up.close()


def accept():
    while True:
        cl, _ = srv.accept()
        threading.Thread(target=relay, args=(cl,), daemon=True).start()


threading.Thread(target=accept, daemon=True).start()
login = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
                        "-o", "IdentityAgent=" + relay_path, "root@git-a.test", "whoami"],
                       capture_output=True, text=True, timeout=60)
r["relayed login"] = [login.returncode, login.stdout.strip()]
binds = [(q, a) for q, a in log if q[0] == EXTENSION and b"session-bind@openssh.com" in q[:40]]
signs = [(q, a) for q, a in log if q[0] == SIGN_REQUEST]
r["relayed binds"] = [a[0] for _, a in binds]
r["relayed signs"] = [a[0] for _, a in signs]
if binds and signs:
    bind_msg, sign_msg = binds[-1][0], signs[-1][0]
    key, at = string(sign_msg, 1)
    data, at = string(sign_msg, at)
    flags = sign_msg[at:at + 4]
    real_sid, rest_at = string(data, 0)
    forged = s(os.urandom(len(real_sid))) + data[rest_at:]
    # The real sign request on a connection that bound no session.
    c = Conn()
    r["replayed sign, no bind"] = c.send_raw(s(sign_msg))
    c.close()
    # The real bind of git-a, then a userauth request for another session.
    c = Conn()
    r["replayed bind"] = c.send_raw(s(bind_msg))
    r["sign for another session"] = c.ask(SIGN_REQUEST, s(key) + s(forged) + flags)
    r["sign other data after bind"] = c.ask(*sign(KEY_A, b"not a userauth request"))
    r["sign with key b after bind"] = c.ask(*sign(KEY_B, userauth(real_sid, KEY_B)))
    r["second bind git-b, bogus"] = c.ask(*bind(HOST_B, os.urandom(32), BOGUS_SIG))
    c.close()
    # Control: the real bind and the real request together.
    c = Conn()
    r["control bind"] = c.send_raw(s(bind_msg))
    r["control sign"] = c.send_raw(s(sign_msg))
    c.close()
print("AGENT " + json.dumps(r, sort_keys=True))
'''


def test_agent_protocol_attacks_from_inside(m, servers, agent):
    """An agent in the run talking the agent protocol itself: signing without
    a bound session, bogus and replayed session binds, a real git-a binding
    used for another session, unknown and malformed requests."""
    a, b = servers
    grant(m, known=default_known(servers), check=True)
    ws = m.workspace()
    put(ws, "agent_protocol.py", AGENT_PROTOCOL)
    cfg = json.dumps({"key_b": base64.b64encode(agent.b.blob).decode(),
                      "host_a": a.host_b64, "host_b": b.host_b64})
    mark_a = a.mark()
    out = m.run(ws, "sh", "-c", GUARD + 'exec python3 /workspace/agent_protocol.py "$1"',
                "probe", cfg, args=["--grant", "ssh:git-a.test"], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    [line] = [l for l in out.stdout.splitlines() if l.startswith("AGENT ")]
    r = json.loads(line[6:])
    print(json.dumps(r, indent=1))
    FAILURE, SUCCESS, SIGNED, EXT_FAILURE = 5, 6, 14, 28
    assert r["listed"] == [agent.a.b64], r["listed"]
    for k in ("sign arbitrary data", "sign userauth, no bind", "sign rsa-sha2-512 flag",
              "sign with key b", "unknown request 200", "unknown request 0",
              "sign after bogus bind"):
        assert r[k] == FAILURE, (k, r[k])
    for k in ("unknown extension", "bind git-a, bogus signature", "bind git-b, bogus signature",
              "bind truncated"):
        assert r[k] in (FAILURE, EXT_FAILURE), (k, r[k])
    # The connection stays usable after refusals; bad frames do not kill the agent.
    assert r["listing after the unknown ones"] == 1
    assert r["listing after the binds"] == 1
    assert r["huge frame"] in ("closed", FAILURE), r["huge frame"]
    assert r["empty frame"] in ("closed", FAILURE), r["empty frame"]
    assert r["listing on a new connection"] == 1
    # The relayed login worked, and its binding was accepted.
    assert r["relayed login"] == [0, HELLO_A], r
    assert r["relayed binds"] and set(r["relayed binds"]) == {SUCCESS}, r
    assert r["relayed signs"] == [SIGNED], r
    assert r["replayed sign, no bind"] == FAILURE
    assert r["sign for another session"] == FAILURE
    assert r["sign other data after bind"] == FAILURE
    assert r["sign with key b after bind"] == FAILURE
    assert r["second bind git-b, bogus"] in (FAILURE, EXT_FAILURE)
    if r["replayed bind"] == SUCCESS:
        # The same binding on a new connection is honoured, so the refusal
        # above is down to the other session's id.
        assert r["control bind"] == SUCCESS and r["control sign"] == SIGNED, r
    else:
        assert r["replayed bind"] in (FAILURE, EXT_FAILURE), r
    assert a.accepted(mark_a) == [agent.a.fingerprint]
    run_id = m.latest()["id"]
    events = ssh_events(m, run_id)
    assert set(allowed_signs(events)) == {("git-a.test", agent.a.fingerprint)}, events
    assert len(refused(events, "sign")) >= 9, events
    assert len(refused(events, "bind")) >= 2, events
    assert m("audit", run_id, timeout=60).returncode == 0


@pytest.mark.parametrize("policy", ["permissive", "strict"])
def test_the_forwarder_is_reachable_from_its_run_and_the_host_only(m, servers, policy):
    """The forwarders sit on the gateway like the proxy and share its guard:
    another network's container (the default bridge) cannot use them."""
    grant(m, known=default_known(servers), check=True)
    ws = m.workspace(agent_yaml=f"network:\n  policy: {policy}\n")
    run_id = m.detach(ws, "sleep", "300", args=["--grant", "ssh:git-a.test"])
    assert m.wait_state(run_id, ("running",)) == "running"
    conf = sh(ENGINE, "exec", f"moat-{run_id}", "cat", "/etc/ssh/ssh_config.d/moat.conf",
              check=True).stdout
    opts = ssh_g(conf.replace("    ", ""))
    gw, port = opts["hostname"][0], opts["port"][0]
    assert gw == gateway_of(m.meta(run_id)), conf
    # The host reaches it; so does the run's own container.
    socket.create_connection((gw, int(port)), timeout=5).close()
    inside = sh(ENGINE, "exec", f"moat-{run_id}", "nc", "-z", "-w", "5", gw, port)
    assert inside.returncode == 0, inside.stderr
    other = sh(ENGINE, "run", "--rm", IMAGE, "nc", "-z", "-w", "3", gw, port)
    assert other.returncode != 0, "a container of another network reached the forwarder"
    m("stop", run_id, check=True)


def test_the_seeds_ssh_github_example(m, servers, tmp_path):
    """examples/ssh-github as the README shows it, with this test's sshd
    standing in for github.com (MOAT_RESOLVE maps github.com:22 to it, and
    the fake HOME's known_hosts holds its key), and the test image."""
    a, _ = servers
    m.env["MOAT_RESOLVE"] = resolve(("github.com", a))
    write_known_hosts(m.user_home, [known_hosts_line("github.com", a)])
    out = m("grant", "ssh", "--host", "github.com", check=True)
    assert "Granted SSH access to github.com" in out.stderr
    ws = tmp_path / "ssh-github"
    ws.mkdir()
    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "ssh-github" / "agent.yaml"
    # The stand-in sshd has no `git` user: log in as root there.
    text = example.read_text()
    assert '"git@github.com"' in text
    (ws / "agent.yaml").write_text(text.replace('"git@github.com"', '"root@github.com"'))
    out = m("run", ws, "--image", IMAGE, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hello from git-a as root" in out.stdout, out.stdout + out.stderr


# Runs that must not start -------------------------------------------------------------------

def assert_not_started(m, out, marker="RAN-INSIDE"):
    assert out.returncode != 0, out.stdout + out.stderr
    assert marker not in out.stdout
    assert "panicked" not in out.stderr


def test_run_without_ssh_auth_sock_does_not_start(m, servers):
    grant(m, known=default_known(servers), check=True)
    del m.env["SSH_AUTH_SOCK"]
    out = m.run(m.workspace(), "echo", "RAN-INSIDE", args=["--grant", "ssh:git-a.test"])
    assert_not_started(m, out)
    assert "SSH_AUTH_SOCK" in out.stderr, out.stderr


def test_run_whose_key_left_the_agent_does_not_start(m, servers, fresh_agent):
    m.env["SSH_AUTH_SOCK"] = str(fresh_agent.sock)
    grant(m, known=default_known(servers), check=True)
    fresh_agent.remove(fresh_agent.a)
    assert fresh_agent.fingerprints() == [fresh_agent.b.fingerprint]
    out = m.run(m.workspace(), "echo", "RAN-INSIDE", args=["--grant", "ssh:git-a.test"])
    assert_not_started(m, out)
    assert fresh_agent.a.fingerprint in out.stderr, out.stderr


def test_run_for_a_host_without_a_known_host_key_does_not_start(m, servers):
    _, b = servers
    grant(m, known=[known_hosts_line("git-b.test", b)], check=True)
    out = m.run(m.workspace(), "echo", "RAN-INSIDE", args=["--grant", "ssh:git-a.test"])
    assert_not_started(m, out)
    assert "known_hosts" in out.stderr, out.stderr
    assert "git-a.test" in out.stderr, out.stderr


def test_mounting_the_host_agent_or_ssh_keys_is_refused(m, servers, fresh_agent, tmp_path):
    """`mounts:` in agent.yaml (which a previous run could have written into
    the workspace) cannot hand a run the user's agent socket or ~/.ssh."""
    m.env["SSH_AUTH_SOCK"] = str(fresh_agent.sock)
    ssh_dir = pathlib.Path(m.env["HOME"]) / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    for source, what in ((fresh_agent.sock.parent, "SSH agent's socket"),
                         (fresh_agent.sock, "SSH agent's socket"),
                         (ssh_dir, "SSH keys"),
                         (ssh_dir.parent, "SSH keys")):
        ws = tmp_path / f"ws-{abs(hash(str(source)))}"
        ws.mkdir()
        (ws / "agent.yaml").write_text(f"mounts:\n  - {source}:/k\n")
        out = m.run(ws, "echo", "RAN-INSIDE")
        assert_not_started(m, out)
        assert what in out.stderr, (source, out.stderr)


# Python ------------------------------------------------------------------------------------

def test_python_grant_and_run(tmp_path, monkeypatch, servers, agent):
    a, b = servers
    home = tmp_path / "home"
    user = tmp_path / "user"
    write_known_hosts(user, default_known(servers))
    monkeypatch.setenv("MOAT_HOME", str(home))
    monkeypatch.setenv("MOAT_KEYRING_BACKEND", "file")
    monkeypatch.setenv("HOME", str(user))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.sock))
    monkeypatch.setenv("MOAT_RESOLVE", resolve(("git-a.test", a), ("git-b.test", b)))
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chown(ws, 1000, 1000)
    try:
        g = moat.grant("ssh", host="git-a.test", home=home)
        assert g["host"] == "git-a.test" and g["key"]["fingerprint"] == agent.a.fingerprint
        mark = a.mark()
        r = moat.run(ws, command=["sh", "-c", GUARD + f"{SSH} root@git-a.test whoami && "
                                  "git ls-remote root@git-a.test:repo.git"],
                     grants=["ssh:git-a.test"], image=IMAGE, home=home, timeout=120)
        assert r.exit_code == 0, r.output + r.stderr
        assert r.output.splitlines()[0] == HELLO_A
        assert "refs/heads/main" in r.output
        assert a.accepted(mark) == [agent.a.fingerprint] * 2
        report = r.audit().verify()
        assert report["ok"] and dict(report["types"]).get("ssh_agent", 0) >= 2, report
        assert [t for t in r.trace() if t.get("method") == "SSH" and t["host"] == "git-a.test"]
    finally:
        moat.clean(home=home)
