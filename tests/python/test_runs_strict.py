"""Strict network policy, end to end: `moat run` with `network: {policy:
strict}` in agent.yaml, the real `moat` binary and the real Docker engine.

From inside a strict run only the proxy is reachable: not this host's other
ports (TCP, UDP, DNS, ICMP, IPv6), not other containers. The enforcement is
on the host, so it must also hold against root with every capability in the
container's network namespace, after it flushed the container's own firewall
and rewrote its routes.

Every probe aims at this host's own addresses, listeners this test runs on
0.0.0.0 / ::, or a helper container of ours on the default bridge; nothing
is sent anywhere else. A control test runs the same probes in a permissive
run, where the host paths are open, to show the probes do detect a path."""

import json
import os
import signal
import socket
import time

import pytest

from runhelp import (ENGINE, HELPER_SERVER, PROBE_SCRIPT, TOKEN, HostTargets, Moat, bridge_link_local,
                     bridge_of, container_alive, docker_objects, escape_probes, gateway_of,
                     helper_container, make_upstream, netfilter_rules, parse_probes,
                     process_gone, reached, require_docker, sh, wait_until)

require_docker()

STRICT_YAML = """\
grants:
  - github
network:
  policy: strict
  allow:
    - api.github.com
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = make_upstream(tmp_path_factory.mktemp("upstream"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def targets():
    t = HostTargets()
    yield t
    t.close()


@pytest.fixture(scope="module")
def helper():
    """(name, ip) of a container of ours on the default bridge with a TCP
    listener on 8080 and a UDP echo on 8081."""
    name, ip = helper_container(HELPER_SERVER)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:  # reachable from the host: it listens
            try:
                socket.create_connection((ip, 8080), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the helper container does not listen on 8080")
        yield name, ip
    finally:
        sh(ENGINE, "rm", "-f", name)


@pytest.fixture
def m(tmp_path, upstream):
    moat = Moat(tmp_path, upstream)
    moat.grant_github()
    yield moat
    moat.cleanup()


def chains(run_id):
    chain = "MOAT-" + run_id[4:]
    return chain in netfilter_rules("iptables"), chain in netfilter_rules("ip6tables")


# Each probe's time limit: 2 s where every probe should be blocked (a
# blocked path stays blocked however long it is tried), longer where some
# must get through, so a slow, loaded machine does not fail those.
BLOCKED_T = 2
REACH_T = 5


def probe_in_container(run_id, probes, user=None, timeout=BLOCKED_T):
    """Runs the probe script with the image's python3 via docker exec."""
    cfg = json.dumps({"probes": probes, "timeout": timeout})
    args = [ENGINE, "exec"] + (["-u", user] if user else []) + \
        [f"moat-{run_id}", "python3", "-c", PROBE_SCRIPT, cfg]
    out = sh(*args, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return parse_probes(out.stdout)


def container_pid(run_id):
    return sh(ENGINE, "inspect", "-f", "{{.State.Pid}}", f"moat-{run_id}",
              check=True).stdout.strip()


def in_netns(run_id, *cmd, timeout=60):
    """A host command inside the container's network namespace, as root with
    every capability."""
    return sh("nsenter", "-t", container_pid(run_id), "-n", *cmd, timeout=timeout)


def probe_in_netns(run_id, probes, gw, timeout=BLOCKED_T):
    cfg = json.dumps({"probes": probes, "timeout": timeout, "gw": gw})
    out = in_netns(run_id, "/usr/bin/python3", "-c", PROBE_SCRIPT, cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    return parse_probes(out.stdout)


def assert_all_blocked(results, probes, targets, before):
    print("probe results:", json.dumps(results, indent=1, sort_keys=True))
    opened = [k for k in reached(results) if k in probes]
    assert opened == [], json.dumps(results, indent=1)
    for k in probes:
        assert results[k].startswith("blocked"), (k, results[k])
    after = targets.received_anything()
    for kind in after:
        new = after[kind][len(before[kind]):]
        assert new == [], f"the host's {kind} listener received {new}"


# 12 ----------------------------------------------------------------------------

def test_strict_allows_only_the_allowed_host_through_the_proxy(m, upstream):
    ws = m.workspace(agent_yaml=STRICT_YAML)
    script = (
        "curl -sS --max-time 20 https://api.github.com/user; echo; "
        "curl -s -o /dev/null -w 'http:%{http_code}\\n' --max-time 20 http://other.test/strict-x; "
        "curl -s -o /dev/null -w 'connect:%{http_connect} code:%{http_code}\\n' --max-time 20 "
        "https://other.test/strict-y; "
        "curl -s --max-time 20 http://other.test/strict-z"
    )
    out = m.run(ws, "sh", "-c", script, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == {"login": "octocat"}
    assert "http:403" in lines
    # HTTPS refusals are answered inside TLS, where the client reads them.
    assert "connect:200 code:403" in lines
    assert "Moat: request blocked by network policy." in out.stdout
    assert 'Host "other.test" is not in the allow list.' in out.stdout
    assert not [r for r in upstream.seen if r["path"].startswith("/strict-")]
    [req] = [r for r in upstream.seen if r["path"] == "/user"][-1:]
    assert req["authorization"] == [f"Bearer {TOKEN}"]
    run = m.latest()
    assert run["policy"] == "strict" and run["state"] == "stopped"
    trace = [json.loads(l) for l in
             m("trace", run["id"], "--network", "--json", check=True).stdout.splitlines()]
    denied = [r for r in trace if r.get("host") == "other.test"]
    assert denied and all(r.get("denied") for r in denied), trace
    audit = [json.loads(l) for l in (m.dir(run["id"]) / "audit.jsonl").read_text().splitlines()]
    [created] = [e["data"] for e in audit if e["type"] == "container_created"]
    # Podman's internal networks have no gateway for the proxy: there the
    # host firewall alone keeps the run in (as it does on Docker anyway).
    assert created["firewall"] is True
    assert created["internal_network"] is (ENGINE == "docker")
    assert created["cap_drop"] == ["ALL"]
    assert any(e["type"] == "policy_decision" and not e["data"]["allowed"]
               and e["data"]["host"] == "other.test" for e in audit)
    # 14: once the run is over, its firewall chains are gone.
    m.wait_cleaned(run["id"])
    assert chains(run["id"]) == (False, False)
    assert docker_objects(run["id"]) == ([], [])


def test_strict_refusals_explain_themselves_to_https_clients(m, upstream):
    """curl, Python requests and git each show the seeds' message for a host
    strict mode refuses, not a bare failed CONNECT; nothing reaches it."""
    ws = m.workspace(agent_yaml=STRICT_YAML)
    script = (
        "curl -sS --max-time 20 https://other.test/refused-curl; echo \"curl-exit:$?\"; "
        "python3 -c 'import requests; r = requests.get(\"https://other.test/refused-py\", "
        "timeout=20); print(\"py-status:\", r.status_code); print(r.text)'; "
        "git clone https://other.test/refused-git.git /tmp/r 2>&1; echo \"git-exit:$?\""
    )
    out = m.run(ws, "sh", "-c", script, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    seeds = ("Moat: request blocked by network policy.\n"
             "Host \"other.test\" is not in the allow list.\n"
             "Add it to network.allow in agent.yaml or use policy: permissive.")
    curl_part, rest = text.split("curl-exit:", 1)
    py_part, git_part = rest.split("Cloning into", 1)
    assert seeds in curl_part, text
    assert "py-status: 403" in py_part and seeds in py_part, text
    # git shows a text/plain refusal as the remote's message.
    assert "remote: Moat: request blocked by network policy." in git_part, text
    assert "CONNECT tunnel failed" not in text and "ProxyError" not in text, text
    assert not [r for r in upstream.seen if r["path"].startswith("/refused")]
    run_id = m.latest()["id"]
    trace = [json.loads(l) for l in
             m("trace", run_id, "--network", "--json", check=True).stdout.splitlines()]
    refused = [r for r in trace if r.get("host") == "other.test"]
    assert {r["url"] for r in refused} >= {"https://other.test/refused-curl",
                                           "https://other.test/refused-py"}, refused
    assert all(r["status"] == 403 and r["denied"] == "network policy" for r in refused), refused


def test_strict_blocks_every_path_but_the_proxy(m, targets, helper):
    ws = m.workspace(agent_yaml=STRICT_YAML)
    run_id = m.detach(ws, "sleep", "120")
    meta = m.meta(run_id)
    gw = gateway_of(meta)
    proxy_port = int(meta["proxy"].rsplit(":", 1)[1])
    assert chains(run_id) == (True, True)
    # The proxy listens on the run's gateway only, not on every interface.
    listening = sh("ss", "-Hltn", f"sport = :{proxy_port}").stdout.split()
    assert f"{gw}:{proxy_port}" in listening, listening
    # On Docker the network is internal too (a Podman network that is has
    # no gateway: there the host firewall alone holds, as tested below).
    if ENGINE == "docker":
        net = json.loads(sh(ENGINE, "network", "inspect", f"moat-{run_id}",
                            check=True).stdout)[0]
        assert net["Internal"] is True
    # The allowed path works from this very container.
    ok = sh(ENGINE, "exec", f"moat-{run_id}", "curl", "-sS", "--max-time", "20",
            "https://api.github.com/user")
    assert json.loads(ok.stdout) == {"login": "octocat"}, ok.stderr
    probes = escape_probes(targets, gw, helper[1], bridge_link_local(bridge_of(run_id)))
    probes_ok = dict(probes, **{"tcp to the proxy": ["tcp", gw, proxy_port]})
    before = targets.received_anything()
    # As the agent (the image's default user is not used: moat's non-root uid).
    results = probe_in_container(run_id, probes_ok, timeout=REACH_T)
    assert results["uid"] != 0
    assert results["gateway"] == gw
    assert results["tcp to the proxy"].startswith("reached"), results
    assert_all_blocked(results, probes, targets, before)
    # As root in the container (no capabilities: moat dropped them).
    results = probe_in_container(run_id, probes, user="0")
    assert results["uid"] == 0
    assert_all_blocked(results, probes, targets, before)
    m("stop", run_id, "-t", "1", check=True)
    assert chains(run_id) == (False, False)


# 13 ----------------------------------------------------------------------------

ROOT_ATTACK = ("iptables -F; iptables -t nat -F; iptables -t mangle -F; "
               "iptables -P OUTPUT ACCEPT; iptables -P INPUT ACCEPT; "
               "ip route replace default via {gw}; ip route add 172.16.0.0/12 via {gw}; "
               "ip route add 192.0.0.0/8 via {gw}")


def test_strict_holds_against_root_with_every_capability(m, targets, helper):
    ws = m.workspace(agent_yaml=STRICT_YAML)
    run_id = m.detach(ws, "sleep", "120")
    meta = m.meta(run_id)
    gw = gateway_of(meta)
    proxy_port = int(meta["proxy"].rsplit(":", 1)[1])
    link_local = bridge_link_local(bridge_of(run_id))
    probes = escape_probes(targets, gw, helper[1], link_local)
    before = targets.received_anything()

    # docker exec --privileged -u 0: the container was created with
    # no-new-privileges and no capabilities. Either the engine refuses to
    # start the privileged process, or it starts and still gets nowhere.
    attack = ROOT_ATTACK.format(gw=gw)
    priv = sh(ENGINE, "exec", "--privileged", "-u", "0", f"moat-{run_id}", "sh", "-c",
              attack + "; iptables -S; echo ATTACK-RAN")
    if "ATTACK-RAN" in priv.stdout:
        results = parse_probes(sh(ENGINE, "exec", "--privileged", "-u", "0", f"moat-{run_id}",
                                  "python3", "-c", PROBE_SCRIPT,
                                  json.dumps({"probes": probes, "timeout": BLOCKED_T})).stdout)
        assert_all_blocked(results, probes, targets, before)
    else:
        assert priv.returncode != 0
        said = (priv.stdout + priv.stderr).lower()
        assert "caps" in said or "privilege" in said, said

    # Root with every capability in the container's network namespace
    # (what a container escape short of the host would give): flush the
    # container's firewall, open its policies, reroute, turn IPv6 on.
    attack6 = ("echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
               "echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; "
               "ip -6 addr add fe80::beef/64 dev eth0 nodad; "
               "ip -6 addr add fd00:beef::2/64 dev eth0 nodad; ")
    if link_local:
        attack6 += f"ip -6 route replace default via {link_local} dev eth0; "
    out = in_netns(run_id, "sh", "-c", attack + "; " + attack6 +
                   "echo; iptables -S; ip route; ip -6 addr show dev eth0")
    assert "-P OUTPUT ACCEPT" in out.stdout, out.stdout + out.stderr
    assert f"default via {gw}" in out.stdout
    assert "fe80::beef" in out.stdout  # IPv6 is on in the container now
    probes_ok = dict(probes, **{"tcp to the proxy": ["tcp", gw, proxy_port]})
    results = probe_in_netns(run_id, probes_ok, gw, timeout=REACH_T)
    assert results["uid"] == 0
    assert results["tcp to the proxy"].startswith("reached"), results
    assert_all_blocked(results, probes, targets, before)
    # The host's rules are untouched by all that.
    assert chains(run_id) == (True, True)
    m("stop", run_id, "-t", "1", check=True)
    assert chains(run_id) == (False, False)


# 14 ----------------------------------------------------------------------------

def test_strict_chains_are_removed_when_a_run_ends_or_its_supervisor_dies(m):
    ws = m.workspace(agent_yaml=STRICT_YAML)
    out = m.run(ws, "true")
    assert out.returncode == 0, out.stderr
    done = m.latest()["id"]
    m.wait_cleaned(done)
    assert chains(done) == (False, False)
    # A strict run whose supervisor is killed: the next `moat list` marks it
    # failed and removes its container, network and chains.
    run_id = m.detach(ws, "sleep", "120")
    assert chains(run_id) == (True, True)
    pid = m.meta(run_id)["supervisor"][0]
    os.kill(pid, signal.SIGKILL)
    wait_until("the killed supervisor is gone", lambda: process_gone(pid), 30)

    def state():
        [run] = [r for r in m.runs() if r["id"] == run_id]
        return run["state"], container_alive(run_id), chains(run_id), docker_objects(run_id)

    wait_until("the run is failed and its container, network and chains are gone",
               lambda: state() == ("failed", False, (False, False), ([], [])), 30, show=state)
    [run] = [r for r in m.runs() if r["id"] == run_id]
    assert run["state"] == "failed"
    assert not container_alive(run_id)
    assert chains(run_id) == (False, False)
    assert docker_objects(run_id) == ([], [])
    leftovers = [l for l in netfilter_rules("iptables").splitlines()
                 + netfilter_rules("ip6tables").splitlines()
                 if run_id[4:] in l or done[4:] in l]
    assert leftovers == []


# Control ------------------------------------------------------------------------

def test_control_the_probes_do_reach_the_host_in_permissive_mode(m, targets):
    """The same probes in a permissive run: the host paths are open there,
    so the strict tests' "blocked" comes from the policy, not the probes."""
    run_id = m.detach(m.workspace(), "sleep", "120")
    gw = gateway_of(m.meta(run_id))
    assert chains(run_id) == (False, False)
    link_local = bridge_link_local(bridge_of(run_id))
    probes = escape_probes(targets, gw, None, None)
    before = targets.received_anything()
    results = probe_in_container(run_id, probes, timeout=REACH_T)
    expect = ["tcp to host at gateway", "curl --noproxy to host at gateway",
              "udp to host at gateway", "dns to host at gateway", "icmp to gateway"]
    expect += [f"tcp to host at {a}" for a in targets.own_v4]
    for k in expect:
        assert results[k].startswith("reached"), (k, results)
    after = targets.received_anything()
    assert len(after["tcp"]) > len(before["tcp"])
    assert len(after["udp"]) > len(before["udp"])
    assert len(after["dns"]) > len(before["dns"])
    if link_local:
        in_netns(run_id, "sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                 "echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; "
                 "ip -6 addr add fe80::beef/64 dev eth0 nodad")
        six = {"tcp6 to host link-local on the bridge":
               ["tcp6", f"{link_local}%eth0", targets.tcp6.port]}
        results = probe_in_netns(run_id, six, gw, timeout=REACH_T)
        assert reached(results) == list(six), results
