"""SSH login benchmark: what a run's SSH path (the per-host forwarder and the
filtering agent) adds to an ssh login, in one run.

Inside one permissive moat run, with the same image, client, key and server,
it alternates N logins each way:

- direct: ssh to the server's port on the host, the key in a plain
  ssh-agent started inside the container;
- moat:   `ssh git-bench.test`, through the run's forwarder, signed by the
  run's filtering agent (which relays to the user's agent on the host).

The server is a real sshd on this host with ForceCommand true. Every address
is this host's. Usage: python3 bench/ssh_login.py MOAT_BINARY [--logins N]
[--out FILE]."""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

IMAGE = "moat-test:bookworm"

INSIDE = r'''
set -e
n=$1; port=$2
gw=$(ip route | awk '/^default/ {print $3; exit}')
eval "$(ssh-agent -s)" >/dev/null
cp /workspace/key /tmp/key && chmod 600 /tmp/key && ssh-add -q /tmp/key
common="-o BatchMode=yes -o LogLevel=ERROR"
direct() { ssh $common -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p "$port" root@"$gw" true; }
viamoat() { SSH_AUTH_SOCK=/run/moat/ssh/agent.sock ssh $common root@git-bench.test true; }
now() { date +%s%N; }
direct; viamoat  # warm up
i=0
while [ $i -lt "$n" ]; do
  t=$(now); direct; echo "direct $(( $(now) - t ))"
  t=$(now); viamoat; echo "moat $(( $(now) - t ))"
  i=$((i + 1))
done
kill "$SSH_AGENT_PID"
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("moat")
    ap.add_argument("--logins", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not shutil.which("/usr/sbin/sshd"):
        print("sshd is missing: run scripts/setup.sh", file=sys.stderr)
        return 2
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="moat-ssh-bench-"))
    procs = []
    try:
        (tmp / "home" / ".ssh").mkdir(parents=True)
        ws = tmp / "ws"
        ws.mkdir()
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench@moat", "-f", str(ws / "key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
        (tmp / "authorized_keys").write_text((ws / "key.pub").read_text())
        port = free_port()
        pathlib.Path("/run/sshd").mkdir(exist_ok=True)
        (tmp / "sshd_config").write_text("\n".join([
            f"Port {port}", "ListenAddress 0.0.0.0", f"HostKey {tmp}/host_key",
            f"AuthorizedKeysFile {tmp}/authorized_keys", "StrictModes no",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            f"PidFile {tmp}/sshd.pid", "ForceCommand true", "MaxStartups 100:30:200",
        ]) + "\n")
        procs.append(subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(tmp / "sshd_config"),
                                       "-E", str(tmp / "sshd.log")]))
        agent_sock = tmp / "agent.sock"
        procs.append(subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(100):
            if agent_sock.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock), "HOME": str(tmp / "home"),
               "MOAT_HOME": str(tmp / "moat-home"),
               "MOAT_RESOLVE": f"git-bench.test:22=127.0.0.1:{port}"}
        sh("ssh-add", "-q", str(ws / "key"), env=env)
        os.chmod(ws / "key", 0o644)  # read by the container's user; a throwaway key
        pub = (tmp / "host_key.pub").read_text().split()
        (tmp / "home" / ".ssh" / "known_hosts").write_text(f"git-bench.test {pub[0]} {pub[1]}\n")
        sh(args.moat, "grant", "ssh", "--host", "git-bench.test", env=env)
        (ws / "bench.sh").write_text(INSIDE)
        out = subprocess.run(
            [args.moat, "run", "--image", IMAGE, "--grant", "ssh:git-bench.test", str(ws),
             "--", "sh", "/workspace/bench.sh", str(args.logins), str(port)],
            env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            print(out.stdout, out.stderr, file=sys.stderr)
            return 1
        times: dict[str, list[float]] = {"direct": [], "moat": []}
        for line in out.stdout.splitlines():
            kind, _, ns = line.partition(" ")
            if kind in times:
                times[kind].append(int(ns) / 1e6)
        d, m = times["direct"], times["moat"]
        if len(d) != args.logins or len(m) != args.logins:
            print(out.stdout, out.stderr, file=sys.stderr)
            return 1

        def p(xs, q):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        dm, mm = statistics.median(d), statistics.median(m)
        lines = [
            "# SSH login benchmark",
            "",
            f"`bash scripts/bench-ssh.sh` — {args.logins} logins each way, alternating, in one "
            f"permissive run of `{IMAGE}`; ssh with an ed25519 key to a local sshd "
            "(ForceCommand true).",
            "",
            "| path | median ms | p90 ms | min ms |",
            "| --- | --- | --- | --- |",
            f"| direct (agent inside, host port) | {dm:.1f} | {p(d, 0.9):.1f} | {min(d):.1f} |",
            f"| moat (forwarder + filtering agent) | {mm:.1f} | {p(m, 0.9):.1f} | {min(m):.1f} |",
            "",
            f"moat ÷ direct, median: **{mm / dm:.2f}×** ({mm - dm:+.1f} ms per login).",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if args.out:
            pathlib.Path(args.out).write_text(text)
        return 0
    finally:
        for p_ in procs:
            p_.terminate()
            try:
                p_.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p_.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
