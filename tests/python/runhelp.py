"""Helpers for the end-to-end tests of `moat run` (test_runs_cli.py,
test_runs_strict.py): they drive the real `moat` binary against the real
Docker engine, with the image built by scripts/build-test-image.sh.

Traffic stays on this host: upstream services are local servers (see
upstream.py) that the proxy reaches through MOAT_RESOLVE, and the "other
hosts" the strict-mode tests try to reach are listeners on this host or a
helper container of our own on the default bridge."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time

import pytest

from upstream import Upstream, make_ca

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOAT = ROOT / "target" / "debug" / "moat"
IMAGE = "moat-test:bookworm"
# The engine runs go on (MOAT_RUNTIME, as moat reads it), driven through its
# own command line: `podman` takes the same arguments as `docker`.
ENGINE = os.environ.get("MOAT_RUNTIME") or "docker"
LABEL = "dev.moat.run"
TOKEN = "ghp_E2EsecretRUNtoken0123456789abcdefXY"


@functools.lru_cache(maxsize=None)
def docker_problem() -> str | None:
    """Why the engine's tests cannot run here, or None."""
    if shutil.which(ENGINE) is None:
        return f"the {ENGINE} command is not installed"
    try:
        info = subprocess.run([ENGINE, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"the {ENGINE} engine did not answer `{ENGINE} info` within 60 s"
    if info.returncode != 0:
        return f"no {ENGINE} engine answers (`{ENGINE} info`: {info.stderr.strip()[:200]})"
    image = subprocess.run([ENGINE, "image", "inspect", IMAGE], capture_output=True, timeout=60)
    if image.returncode != 0:
        return f"the image {IMAGE} is missing: build it with `bash scripts/build-test-image.sh`"
    if not MOAT.is_file():
        return f"{MOAT} is missing: run `cargo build -p moat-cli`"
    return None


def require_docker():
    problem = docker_problem()
    if problem:
        pytest.skip(problem, allow_module_level=True)


def netfilter_rules(tool="iptables") -> str:
    """Every rule of the tables moat uses (`filter` for the proxy's guard,
    `mangle` for strict mode), as `iptables -S` prints them."""
    return "".join(sh(tool, "-w", "-t", table, "-S").stdout for table in ("filter", "mangle"))


def sh(*args, timeout=60, check=False, **kw):
    """Runs a host command; returns the CompletedProcess (text)."""
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}: {out.stdout}{out.stderr}")
    return out


class Moat:
    """The `moat` CLI with its own MOAT_HOME and operator settings that point
    api.github.com, github.com and other.test at a local upstream."""

    def __init__(self, tmp: pathlib.Path, upstream: Upstream | None = None):
        self.tmp = tmp
        self.home = tmp / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("GITHUB_TOKEN", "GH_TOKEN", "MOAT_HOME", "DOCKER_HOST")}
        env["MOAT_HOME"] = str(self.home)
        env["MOAT_KEYRING_BACKEND"] = "file"
        if upstream is not None:
            env["MOAT_UPSTREAM_CA_FILE"] = upstream.ca
            env["MOAT_RESOLVE"] = ",".join(f"{k}={v}" for k, v in upstream.resolve().items())
        self.env = env

    def __call__(self, *args, timeout=90, env=None, check=False):
        e = dict(self.env)
        e.update(env or {})
        out = subprocess.run([str(MOAT), *map(str, args)], capture_output=True, text=True,
                             timeout=timeout, env=e, stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise AssertionError(f"moat {args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def popen(self, *args, **kw):
        return subprocess.Popen([str(MOAT), *map(str, args)], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)

    def grant_github(self, token=TOKEN):
        self("grant", "github", "--no-validate", env={"GITHUB_TOKEN": token}, check=True)

    def workspace(self, name="ws", agent_yaml: str | None = None, owner=(1000, 1000)):
        ws = self.tmp / name
        ws.mkdir(parents=True, exist_ok=True)
        if agent_yaml is not None:
            (ws / "agent.yaml").write_text(agent_yaml)
        os.chown(ws, *owner)
        return ws

    def run(self, ws, *cmd, args=(), timeout=90):
        """An attached `moat run`; the CompletedProcess."""
        return self(*(["run", ws, "--image", IMAGE, *args, "--"] + list(cmd)), timeout=timeout)

    def detach(self, ws, *cmd, args=()):
        """A detached `moat run -d`; the run id."""
        out = self(*(["run", ws, "--image", IMAGE, "-d", *args, "--"] + list(cmd)), check=True)
        run_id = out.stdout.strip()
        assert len(run_id) == 16 and run_id.startswith("run_"), out.stdout
        return run_id

    def runs(self):
        return json.loads(self("list", "--json", check=True).stdout)

    def dir(self, run_id):
        return self.home / "runs" / run_id

    def meta(self, run_id):
        return json.loads((self.dir(run_id) / "run.json").read_text())

    def latest(self):
        return self.runs()[0]

    def wait_state(self, run_id, states, timeout=60):
        deadline = time.time() + timeout
        while True:
            state = self.meta(run_id)["state"]
            if state in states or time.time() > deadline:
                return state
            time.sleep(0.1)

    def wait_cleaned(self, run_id, timeout=60):
        """Waits until the run's supervisor has removed what the run held
        (`cleaned` in run.json): `moat run` returns as soon as the exit code
        is known, and cleanup follows."""
        deadline = time.time() + timeout
        while not self.meta(run_id).get("cleaned"):
            assert time.time() < deadline, "the run was not cleaned up within %ss" % timeout
            time.sleep(0.05)

    def wait_log(self, run_id, needle, timeout=30):
        """Waits until `moat logs` of the run shows `needle`."""
        deadline = time.time() + timeout
        while True:
            if needle in self("logs", run_id).stdout:
                return True
            if time.time() > deadline:
                return False
            time.sleep(0.1)

    def cleanup(self):
        """Stops and removes every run of this home, then whatever Docker
        still holds of them. Only this home's runs are touched (not `moat
        clean -f`, which would also remove other homes' live runs)."""
        ids = []
        runs_dir = self.home / "runs"
        if runs_dir.is_dir():
            ids = [p.name for p in runs_dir.iterdir() if p.name.startswith("run_")]
        for run_id in ids:
            try:
                self("stop", run_id, "-t", "1", timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for run_id in ids:
            subprocess.run([ENGINE, "rm", "-f", f"moat-{run_id}"], capture_output=True, timeout=60)
            subprocess.run([ENGINE, "network", "rm", f"moat-{run_id}"], capture_output=True,
                           timeout=60)
            chain = "MOAT-" + run_id[4:]
            for tool in ("iptables", "ip6tables"):
                for table in ("filter", "mangle"):
                    rules = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True,
                                           text=True).stdout
                    for rule in rules.splitlines():
                        if rule.startswith("-A ") and rule.endswith(f"-j {chain}"):
                            subprocess.run([tool, "-w", "-t", table, "-D", *rule.split()[1:]],
                                           capture_output=True)
                    subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True)
                    subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True)
        if not others_live(ids):
            try:
                # Images stay: the next test's run reuses them (a Claude
                # image takes half a minute to make).
                self("clean", "-f", "--keep-images", timeout=60)
            except subprocess.TimeoutExpired:
                pass


def wait_until(what, check, timeout, show=None):
    """Polls `check` until it returns something true (returned), failing
    after `timeout` seconds with `what` (and `show()`, when given, to say
    what was seen instead)."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            seen = f"; seen: {show()}" if show else ""
            raise AssertionError(f"not within {timeout} s: {what}{seen}")
        time.sleep(0.2)


def process_gone(pid) -> bool:
    """Has process `pid` exited? (A zombie that nobody reaps has.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rfind(")") + 2:].split(" ", 1)[0] in ("Z", "X")


def others_live(mine) -> bool:
    """Does the engine hold moat containers of runs other than `mine`?
    (`moat clean -f` would remove them, so we do not call it then.)"""
    out = subprocess.run([ENGINE, "ps", "-a", "--filter", f"label={LABEL}",
                          "--format", '{{.Label "dev.moat.run"}}'],
                         capture_output=True, text=True, timeout=60).stdout.split()
    return any(r not in mine for r in out)


def docker_objects(run_id):
    """(containers, networks) Docker still holds for a run."""
    c = sh(ENGINE, "ps", "-a", "-q", "--filter", f"label={LABEL}={run_id}").stdout.split()
    n = sh(ENGINE, "network", "ls", "-q", "--filter", f"label={LABEL}={run_id}").stdout.split()
    return c, n


def container_alive(run_id) -> bool:
    out = sh(ENGINE, "inspect", "-f", "{{.State.Running}}", f"moat-{run_id}")
    return out.returncode == 0 and out.stdout.strip() == "true"


def gateway_of(meta) -> str:
    return meta["proxy"].rsplit(":", 1)[0]


def bridge_of(run_id) -> str:
    return "mt-" + run_id[4:]


def pexec(run_id, script, timeout=60, privileged=True):
    """`docker exec --privileged -u 0` into a run's container."""
    args = [ENGINE, "exec"] + (["--privileged"] if privileged else []) + \
        ["-u", "0", f"moat-{run_id}", "sh", "-c", script]
    return sh(*args, timeout=timeout)


class TcpListener:
    """A TCP listener on 0.0.0.0 (or ::) of this host that records who
    connected and what they sent."""

    def __init__(self, family=socket.AF_INET, host="0.0.0.0"):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self.data = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted.append(peer)
            try:
                conn.settimeout(2)
                conn.sendall(b"HELLO-FROM-HOST\n")
                try:
                    self.data.append(conn.recv(4096))
                except OSError:
                    pass
            finally:
                conn.close()

    def close(self):
        self._stop = True
        self.thread.join(timeout=2)
        self.sock.close()


class UdpListener:
    """A UDP socket on 0.0.0.0 of this host that records datagrams (and
    answers each, so a DNS-like exchange can succeed if it gets through)."""

    def __init__(self, port=0, host="0.0.0.0"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            self.received.append((data, peer))
            try:
                self.sock.sendto(b"ANSWER:" + data[:64], peer)
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.thread.join(timeout=2)
        self.sock.close()


def make_upstream(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    server = Upstream(cert, key)
    server.ca = ca
    server.users = {TOKEN: "octocat"}
    return server


def helper_container(script="sleep 300"):
    """A container of ours on the default bridge (no moat involved); returns
    (name, ip). The caller removes it."""
    name = f"moat-e2e-helper-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    sh(ENGINE, "run", "-d", "--rm", "--name", name, "--label", "moat-e2e=helper",
       IMAGE, "sh", "-c", script, check=True)
    ip = sh(ENGINE, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", name,
            check=True).stdout.strip()
    assert ip, "the helper container has no IP address on the default bridge"
    return name, ip


def files_holding(paths, needle: str):
    hits = []
    for p in paths:
        p = pathlib.Path(p)
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


# Network probes ---------------------------------------------------------------
#
# One script, run inside a run's container (python3 of the image, as the
# agent) or on the host inside the container's network namespace (nsenter,
# as root with every capability). It tries each path in parallel and prints
# one JSON object: probe name -> "reached: ..." or "blocked: ...".

PROBE_SCRIPT = r'''
import json, os, socket, struct, subprocess, sys, threading

cfg = json.loads(sys.argv[1])
T = cfg.get("timeout", 2.0)


def default_gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<L", int(f[2], 16)))
    return None


gw = cfg.get("gw") or default_gateway()
results = {"gateway": gw, "uid": os.getuid()}


def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(T)
    try:
        s.connect((host, port) if family == socket.AF_INET else socket.getaddrinfo(
            host, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4])
        s.sendall(b"probe\n")
        try:
            banner = s.recv(64)
        except OSError:
            banner = b""
        return "reached: connected" + (" banner " + banner.decode(errors="replace").strip()
                                       if banner else "")
    except OSError as e:
        return f"blocked: {type(e).__name__}: {e}"
    finally:
        s.close()


def udp(host, port, payload=b"moat-probe"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(T)
    try:
        s.sendto(payload, (host, port))
        data, _ = s.recvfrom(512)
        return "reached: answer " + repr(data[:40])
    except OSError as e:
        return f"blocked: {type(e).__name__}: {e}"
    finally:
        s.close()


def dns(host, port):
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + \
        b"\x05probe\x04moat\x04test\x00\x00\x01\x00\x01"
    return udp(host, port, q)


def icmp(host):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    except OSError:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(T)
    body = b"moatping"
    hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4d4f, 1)
    csum_data = hdr + body
    total = sum(struct.unpack("!%dH" % (len(csum_data) // 2), csum_data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    pkt = struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, 0x4d4f, 1) + body
    try:
        s.sendto(pkt, (host, 0))
        while True:
            data, peer = s.recvfrom(512)
            if peer[0] == host:
                return "reached: echo reply"
    except OSError as e:
        return f"blocked: {type(e).__name__}: {e}"
    finally:
        s.close()


def curl_noproxy(url):
    try:
        out = subprocess.run(["curl", "-sS", "--http0.9", "--noproxy", "*", "--max-time", str(T), url],
                             capture_output=True, text=True, timeout=T + 5)
    except Exception as e:
        return f"blocked: {e}"
    if out.returncode == 0:
        return "reached: " + out.stdout.strip()[:60]
    return f"blocked: curl exit {out.returncode} {out.stderr.strip()[:80]}"


jobs = {}
for name, spec in cfg["probes"].items():
    kind, args = spec[0], list(spec[1:])
    args = [gw if a == "GW" else a for a in args]
    if kind == "tcp":
        jobs[name] = (tcp, args)
    elif kind == "tcp6":
        jobs[name] = (lambda h, p: tcp(h, p, socket.AF_INET6), args)
    elif kind == "udp":
        jobs[name] = (udp, args)
    elif kind == "dns":
        jobs[name] = (dns, args)
    elif kind == "icmp":
        jobs[name] = (icmp, args)
    elif kind == "curl":
        jobs[name] = (curl_noproxy, args)


def work(name, fn, args):
    try:
        results[name] = fn(*args)
    except Exception as e:
        results[name] = f"blocked: probe error {type(e).__name__}: {e}"


threads = [threading.Thread(target=work, args=(n, f, a)) for n, (f, a) in jobs.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("PROBES " + json.dumps(results, sort_keys=True))
'''


def parse_probes(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("PROBES ")]
    assert lines, f"the probe script printed no result:\n{stdout}"
    return json.loads(lines[-1][len("PROBES "):])


def reached(results: dict) -> list:
    return sorted(k for k, v in results.items()
                  if isinstance(v, str) and v.startswith("reached"))


class HostTargets:
    """Listeners on this host that the probes aim at: TCP on 0.0.0.0 and ::,
    UDP on 0.0.0.0, a DNS-like UDP listener on port 53 when free, and this
    host's own addresses to aim at (the docker0 address, the first global
    addresses of other interfaces)."""

    def __init__(self):
        self.tcp = TcpListener()
        self.tcp6 = TcpListener(socket.AF_INET6, "::")
        self.udp = UdpListener()
        try:
            self.dns = UdpListener(port=53)
        except OSError:
            self.dns = UdpListener()
        self.own_v4 = []
        self.own_v6 = []
        out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            f = line.split()
            dev, fam, addr = f[1], f[2], f[3].split("/")[0]
            if dev == "lo" or dev.startswith(("mt-", "veth")):
                continue
            if fam == "inet":
                self.own_v4.append(addr)
            elif fam == "inet6" and not addr.startswith("fe80"):
                self.own_v6.append(addr)

    def received_anything(self):
        return {
            "tcp": list(self.tcp.accepted), "tcp6": list(self.tcp6.accepted),
            "udp": list(self.udp.received), "dns": list(self.dns.received),
        }

    def close(self):
        for listener in (self.tcp, self.tcp6, self.udp, self.dns):
            listener.close()


def bridge_link_local(bridge: str, timeout=8) -> str | None:
    """The host's link-local IPv6 address on a bridge, once usable (duplicate
    address detection over); None when the bridge has none."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", bridge],
                             capture_output=True, text=True).stdout
        lls = [l for l in out.splitlines() if " fe80" in l]
        if not lls:
            return None
        ready = [l for l in lls if "tentative" not in l]
        if ready:
            return ready[0].split()[3].split("/")[0]
        if time.time() > deadline:
            return None
        time.sleep(0.2)


def escape_probes(targets: HostTargets, gw: str, helper_ip: str | None,
                  link_local: str | None, v6_scope="eth0"):
    """Every path a strict run must not have (each should be blocked)."""
    p = {
        "tcp to host at gateway": ["tcp", gw, targets.tcp.port],
        "curl --noproxy to host at gateway": ["curl", f"http://{gw}:{targets.tcp.port}/"],
        "udp to host at gateway": ["udp", gw, targets.udp.port],
        "dns to host at gateway": ["dns", gw, targets.dns.port],
        "icmp to gateway": ["icmp", gw],
    }
    for addr in targets.own_v4:
        p[f"tcp to host at {addr}"] = ["tcp", addr, targets.tcp.port]
        p[f"udp to host at {addr}"] = ["udp", addr, targets.udp.port]
        p[f"dns to host at {addr}"] = ["dns", addr, targets.dns.port]
    if helper_ip:
        p["tcp to another container"] = ["tcp", helper_ip, 8080]
        p["udp to another container"] = ["udp", helper_ip, 8081]
    if link_local:
        p["tcp6 to host link-local on the bridge"] = ["tcp6", f"{link_local}%{v6_scope}",
                                                      targets.tcp6.port]
    for addr in targets.own_v6[:2]:
        p[f"tcp6 to host at {addr}"] = ["tcp6", addr, targets.tcp6.port]
    return p


HELPER_SERVER = ("python3 -c 'import socket, threading\n"
                 "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((\"0.0.0.0\", 8081))\n"
                 "def echo():\n"
                 "    while True:\n"
                 "        d, a = u.recvfrom(512); u.sendto(b\"helper:\" + d, a)\n"
                 "threading.Thread(target=echo, daemon=True).start()\n"
                 "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 "s.bind((\"0.0.0.0\", 8080)); s.listen(8)\n"
                 "while True:\n"
                 "    c, a = s.accept(); c.sendall(b\"HELLO-FROM-HELPER\\n\"); c.close()\n'")
