"""Helpers for the end-to-end tests of SSH in runs (test_ssh_runs.py): a real
ssh-agent holding keys made by ssh-keygen, real OpenSSH servers (Debian's
/usr/sbin/sshd) with their own host keys and a bare git repository, and
known_hosts files for a fake $HOME.

Everything listens on this host only: the servers bind 127.0.0.1 (or, for
the one a permissive run reaches directly, every address of this host), and
moat reaches them through MOAT_RESOLVE. The host names the tests use
(`git-a.test`, `git-b.test`) exist nowhere else."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

SSHD = "/usr/sbin/sshd"
CLIENT_TOOLS = ("ssh", "ssh-agent", "ssh-add", "ssh-keygen", "git")


def ssh_problem() -> str | None:
    """Why the SSH tests cannot run here, or None."""
    for tool in CLIENT_TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-client git)"
    if not os.access(SSHD, os.X_OK):
        return (f"{SSHD} is missing: apt-get install openssh-server "
                "(scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        return "the test sshd logs in as root and needs root to start (privilege separation)"
    return None


def require_ssh():
    problem = ssh_problem()
    if problem:
        pytest.skip(problem, allow_module_level=True)


def _run(*args, env=None, check=True, timeout=60, **kw):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                         timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return out


def fingerprint(pub_path) -> str:
    """`SHA256:...` of a public key file, as ssh-add -l prints it."""
    return _run("ssh-keygen", "-l", "-E", "sha256", "-f", pub_path).stdout.split()[1]


def free_port(host="127.0.0.1") -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# The agent -----------------------------------------------------------------------


def terminate(proc):
    """Stops a server process: SIGTERM, then SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

class Key:
    """A client key pair made by ssh-keygen (no passphrase)."""

    def __init__(self, directory: pathlib.Path, name: str, comment: str, kind="ed25519"):
        self.name = name
        self.comment = comment
        self.path = directory / f"id_{name}"
        _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", self.path)
        self.pub_path = pathlib.Path(str(self.path) + ".pub")
        self.pub = self.pub_path.read_text().strip()      # "ssh-ed25519 AAAA... a@test"
        self.key_type, self.b64 = self.pub.split()[:2]
        self.blob = base64.b64decode(self.b64)
        self.fingerprint = fingerprint(self.pub_path)
        self.private_text = self.path.read_text()

    def authorized_line(self) -> str:
        return f"{self.key_type} {self.b64} {self.comment}"


class SshAgent:
    """`ssh-agent -D -a SOCK` with keys A (`a@test`) and B (`b@test`), added
    in that order (so the agent lists A first). `keys` reuses the key pairs
    of another agent."""

    def __init__(self, directory: pathlib.Path, keys=None):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.dir = directory
        self.sock = directory / "agent.sock"
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(self.sock)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError("ssh-agent did not create its socket")
            time.sleep(0.02)
        self.env = {**os.environ, "SSH_AUTH_SOCK": str(self.sock)}
        if keys is None:
            keys = (Key(directory, "a", "a@test"), Key(directory, "b", "b@test"))
        self.a, self.b = keys
        for key in (self.a, self.b):
            self.add(key)
        assert self.fingerprints() == [self.a.fingerprint, self.b.fingerprint]

    @property
    def keys(self):
        return [self.a, self.b]

    def add(self, key: Key):
        _run("ssh-add", "-q", key.path, env=self.env)

    def remove(self, key: Key):
        _run("ssh-add", "-d", key.pub_path, env=self.env)

    def listing(self):
        """`ssh-add -l -E sha256` (CompletedProcess): exit 1 when the agent
        holds nothing or is locked."""
        return _run("ssh-add", "-l", "-E", "sha256", env=self.env, check=False)

    def fingerprints(self) -> list:
        out = self.listing()
        if out.returncode != 0:
            return []
        return [line.split()[1] for line in out.stdout.splitlines() if line.strip()]

    def stop(self):
        terminate(self.proc)


# The servers ---------------------------------------------------------------------

FORCE_COMMAND = r'''#!/bin/sh
# ForceCommand of the test sshd "@NAME@": git over ssh against the bare
# repositories in @REPOS@, "hello" for anything else.
printf '%s\n' "$SSH_ORIGINAL_COMMAND" >> '@COMMANDS@'
case "$SSH_ORIGINAL_COMMAND" in
    git-upload-pack\ *|git-receive-pack\ *)
        verb=${SSH_ORIGINAL_COMMAND%% *}
        arg=$(printf '%s' "${SSH_ORIGINAL_COMMAND#* }" | tr -d "'\"")
        repo='@REPOS@'/$(basename "$arg")
        [ -d "$repo" ] || { echo "no such repository: $arg" >&2; exit 1; }
        exec '@GIT@' "${verb#git-}" "$repo"
        ;;
    *)
        echo "hello from @NAME@ as $(id -un)"
        ;;
esac
'''

# Options newer sshds understand that matter here; dropped when this sshd
# does not know them. (OpenSSH 9.8's penalties would refuse a source that
# failed to log in, as the refusal tests do on purpose.)
OPTIONAL_OPTIONS = [("PerSourcePenalties", "no")]


class Sshd:
    """`/usr/sbin/sshd -D -f CONFIG -E LOG` on LISTEN:<free port>, with its own
    host key (ed25519, rsa or ecdsa), root login by public key only for the
    keys in `authorized` (their authorized_keys lines), and a ForceCommand
    that serves git and says hello."""

    def __init__(self, directory: pathlib.Path, name: str, authorized, host_key_type="ed25519",
                 listen="127.0.0.1"):
        self.name = name
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.listen = listen
        self.log = directory / "sshd.log"
        self.commands = directory / "commands.log"
        self.commands.touch()
        self.host_key_path = directory / f"ssh_host_{host_key_type}_key"
        bits = {"rsa": ["-b", "2048"], "ecdsa": ["-b", "256"]}.get(host_key_type, [])
        _run("ssh-keygen", "-q", "-t", host_key_type, *bits, "-N", "", "-C", f"{name}-host",
             "-f", self.host_key_path)
        self.host_pub = pathlib.Path(str(self.host_key_path) + ".pub").read_text().strip()
        self.host_key_type, self.host_b64 = self.host_pub.split()[:2]
        self.host_fingerprint = fingerprint(str(self.host_key_path) + ".pub")
        self.authorized_keys = directory / "authorized_keys"
        self.authorized_keys.write_text("".join(line + "\n" for line in authorized))
        self.repos = directory / "repos"
        self.repo_marker = f"repository of {name} {os.urandom(4).hex()}"
        self._make_repo()
        self.script = directory / "force-command.sh"
        self.script.write_text(FORCE_COMMAND.replace("@NAME@", name)
                               .replace("@REPOS@", str(self.repos))
                               .replace("@COMMANDS@", str(self.commands))
                               .replace("@GIT@", shutil.which("git")))
        os.chmod(self.script, 0o755)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        self.proc = None
        for attempt in range(5):
            self.port = free_port("127.0.0.1" if listen == "0.0.0.0" else listen)
            self._write_config()
            if self._start():
                return
        raise AssertionError(f"sshd {name} did not start:\n{self.log_text()}")

    # setup ------------------------------------------------------------------

    def _make_repo(self):
        git = shutil.which("git")
        self.repos.mkdir()
        bare = self.repos / "repo.git"
        work = self.dir / "seed"
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.dir),
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@test",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@test"}
        _run(git, "init", "-q", "--bare", "-b", "main", bare, env=env)
        _run(git, "init", "-q", "-b", "main", work, env=env)
        (work / "README").write_text(self.repo_marker + "\n")
        _run(git, "-C", work, "add", "README", env=env)
        _run(git, "-C", work, "commit", "-q", "-m", "first", env=env)
        _run(git, "-C", work, "push", "-q", bare, "main", env=env)
        shutil.rmtree(work)

    def _config_lines(self, optional):
        lines = [
            f"ListenAddress {self.listen}:{self.port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "AllowUsers root",
            "AllowAgentForwarding no",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "PermitUserEnvironment no",
            "LoginGraceTime 30",
            "MaxStartups 50",
            "LogLevel VERBOSE",
            f"ForceCommand {self.script}",
        ]
        return lines + [f"{k} {v}" for k, v in optional]

    def _write_config(self):
        self.config = self.dir / "sshd_config"
        optional = list(OPTIONAL_OPTIONS)
        while True:
            self.config.write_text("\n".join(self._config_lines(optional)) + "\n")
            check = _run(SSHD, "-t", "-f", self.config, check=False)
            if check.returncode == 0:
                return
            bad = [o for o in optional if o[0].lower() in check.stderr.lower()]
            if not bad:
                raise AssertionError(f"sshd -t rejects the test config:\n{check.stderr}")
            optional = [o for o in optional if o not in bad]

    def _start(self) -> bool:
        if self.log.exists():
            self.log.unlink()
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(self.config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        host = "127.0.0.1" if self.listen == "0.0.0.0" else self.listen
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            try:
                with socket.create_connection((host, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        return False

    # use --------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where this host reaches it (for MOAT_RESOLVE)."""
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The current length of the log; see `log_since`."""
        return len(self.log_text())

    def log_since(self, mark: int) -> str:
        return self.log_text()[mark:]

    def accepted(self, mark=0) -> list:
        """Fingerprints of the keys that logged in since `mark`."""
        return [line.split()[-1] for line in self.log_since(mark).splitlines()
                if "Accepted publickey for " in line]

    def commands_since(self, mark: int) -> list:
        return self.commands.read_text().splitlines()[mark:]

    def command_count(self) -> int:
        return len(self.commands.read_text().splitlines())

    def login(self, key: Key, command="whoami"):
        """Logs in from this host with `key`'s private key file (no agent, host
        key pinned): the control that the server accepts the key."""
        known = self.dir / "client_known_hosts"
        known.write_text(f"[127.0.0.1]:{self.port} {self.host_pub}\n")
        return _run("ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                    "-o", "IdentityAgent=none", "-o", f"UserKnownHostsFile={known}",
                    "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                    "-i", key.path, "-p", self.port, "root@127.0.0.1", command, check=False)

    def bare_log(self) -> str:
        """`git log --format=%s main` of the bare repository."""
        return _run(shutil.which("git"), "--git-dir", self.repos / "repo.git", "log",
                    "--format=%s", "main",
                    env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.dir)}).stdout

    def stop(self):
        terminate(self.proc)


# known_hosts -----------------------------------------------------------------------

def hashed_name(host: str, salt: bytes | None = None) -> str:
    """The `|1|salt|hash` form ssh-keygen -H writes (HashKnownHosts)."""
    salt = salt or os.urandom(20)
    digest = hmac.new(salt, host.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def known_hosts_line(host: str, server_or_pub, form="plain", marker=None) -> str:
    """One known_hosts line for `host` with a server's host key (or a public
    key line), in the form `plain` (`host`), `list` (`git-z.test,host`),
    `bracket` (`[host]:22`) or `hashed` (`|1|...`), optionally with a marker
    (`@revoked`)."""
    pub = server_or_pub.host_pub if isinstance(server_or_pub, Sshd) else server_or_pub
    key_type, b64 = pub.split()[:2]
    names = {"plain": host, "list": f"git-z.test,{host}", "bracket": f"[{host}]:22",
             "hashed": hashed_name(host)}[form]
    line = f"{names} {key_type} {b64}"
    return f"{marker} {line}" if marker else line


def write_known_hosts(home: pathlib.Path, lines) -> pathlib.Path:
    """Writes `home/.ssh/known_hosts` (the fake $HOME of moat and its
    supervisor) with these lines; returns its path."""
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    path = ssh_dir / "known_hosts"
    path.write_text("".join(line + "\n" for line in lines))
    os.chmod(path, 0o600)
    return path


# What would give a private key away ------------------------------------------------------

def _read_string(buf: bytes, at: int):
    n = int.from_bytes(buf[at:at + 4], "big")
    return buf[at + 4:at + 4 + n], at + 4 + n


def private_key_needles(key: Key) -> list:
    """(name, bytes) pairs whose presence anywhere would mean the private key
    leaked: its 32-byte ed25519 seed (raw and hex) and every base64 line of
    its OpenSSH file that encodes seed bytes (the other lines hold public
    bytes and the file's header only)."""
    lines = [l for l in key.private_text.splitlines() if l and not l.startswith("-----")]
    raw = base64.b64decode("".join(lines))
    magic = b"openssh-key-v1\0"
    assert raw.startswith(magic), f"{key.path} is not an OpenSSH private key"
    at = len(magic)
    cipher, at = _read_string(raw, at)
    assert cipher == b"none", "the test keys have no passphrase"
    _, at = _read_string(raw, at)           # kdf name
    _, at = _read_string(raw, at)           # kdf options
    at += 4                                 # number of keys
    _, at = _read_string(raw, at)           # public key
    private, at = _read_string(raw, at)
    start = at - len(private)
    p = 8                                   # two check integers
    key_type, p = _read_string(private, p)
    assert key_type == b"ssh-ed25519", key_type
    _, p = _read_string(private, p)         # public part
    secret, p = _read_string(private, p)    # seed || public
    seed = secret[:32]
    seed_at = start + p - len(secret)
    assert raw[seed_at:seed_at + 32] == seed
    needles = [(f"key {key.name} seed", seed), (f"key {key.name} seed hex", seed.hex().encode())]
    pos = 0
    for i, line in enumerate(lines):
        lo, hi = pos * 6 // 8, ((pos + len(line)) * 6 + 7) // 8
        pos += len(line)
        if lo < seed_at + 32 and seed_at < hi:
            needles.append((f"key {key.name} file line {i}", line.encode()))
    return needles


# Fixtures (import them into a test module) ------------------------------------------------

def short_tmp(prefix: str) -> pathlib.Path:
    """A short directory for sockets (a unix socket path has 107 bytes)."""
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="module")
def agent():
    """The user's ssh-agent, shared by a module's tests: keys A and B."""
    d = short_tmp("moat-ssh-agent-")
    a = SshAgent(d)
    yield a
    a.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fresh_agent(agent):
    """An ssh-agent of the test's own holding the same keys A and B, for tests
    that change (or try to change) what the agent holds."""
    d = short_tmp("moat-ssh-agent-")
    a = SshAgent(d, keys=(agent.a, agent.b))
    yield a
    a.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, agent):
    """A factory: `sshd(name, host_key_type="ed25519", listen="127.0.0.1")`
    starts a server that accepts both keys A and B for root (so a refusal is
    the filtering agent's doing, never the server's). Servers are shared by
    name within the module and stopped at its end."""
    made = {}

    def start(name, host_key_type="ed25519", listen="127.0.0.1"):
        spec = (host_key_type, listen)
        if name in made:
            server, was = made[name]
            assert was == spec, f"sshd {name} was started as {was}, not {spec}"
            return server
        server = Sshd(tmp_path_factory.mktemp(f"sshd-{name}"), name,
                      [k.authorized_line() for k in agent.keys],
                      host_key_type=host_key_type, listen=listen)
        made[name] = (server, spec)
        return server

    yield start
    for server, _ in made.values():
        server.stop()
