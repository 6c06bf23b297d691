#!/usr/bin/env bash
# Builds libmoat, compiles the C tests against include/moat.h with gcc, and
# runs them against both the shared and the static library.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
profile_dir="$root/target/debug"
cargo build -q -p moat-ffi -p moat-cli
# libmoat.so carries a versioned SONAME (moat-ffi/build.rs), by which the
# programs linked to it here load it: the link the install would make.
soname=$(readelf -d "$profile_dir/libmoat.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
if [ -n "$soname" ]; then ln -sfn libmoat.so "$profile_dir/$soname"; fi
out="$root/target/c-tests"
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -I "$root/include")
# Waits (up to 30 s, on a slow machine too) for an ssh-agent's socket; says
# so and fails when it does not come.
wait_for_socket() {
  for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done
  echo "c: $2 did not make its socket $1 within 30 s" >&2
  exit 1
}
gcc "${cflags[@]}" -D_POSIX_C_SOURCE=200809L tests/c/test_config.c -o "$out/test_config_shared" \
  -L "$profile_dir" -lmoat -Wl,-rpath,"$profile_dir"
gcc "${cflags[@]}" -D_POSIX_C_SOURCE=200809L tests/c/test_config.c -o "$out/test_config_static" \
  "$profile_dir/libmoat.a" -lpthread -ldl -lm
gcc "${cflags[@]}" -D_POSIX_C_SOURCE=200809L tests/c/test_proxy.c -o "$out/test_proxy" \
  -L "$profile_dir" -lmoat -Wl,-rpath,"$profile_dir"
gcc "${cflags[@]}" -D_POSIX_C_SOURCE=200809L tests/c/test_run.c -o "$out/test_run" \
  -L "$profile_dir" -lmoat -Wl,-rpath,"$profile_dir"
gcc "${cflags[@]}" -D_POSIX_C_SOURCE=200809L tests/c/test_claude.c -o "$out/test_claude" \
  -L "$profile_dir" -lmoat -Wl,-rpath,"$profile_dir"
echo "c: config, shared library"
mkdir -p "$scratch/shared" "$scratch/static" "$scratch/proxy" "$scratch/bin"
# A fake 1Password CLI for the secrets test.
cat > "$scratch/bin/op" <<'OP'
#!/bin/sh
[ "$3" = "op://Dev/C/field" ] && { printf 'c-op-secret'; exit 0; }
echo "[ERROR] item not found" >&2; exit 1
OP
chmod +x "$scratch/bin/op"
PATH="$scratch/bin:$PATH" "$out/test_config_shared" "$scratch/shared"
echo "c: config, static library"
PATH="$scratch/bin:$PATH" "$out/test_config_static" "$scratch/static"

# The proxy test needs a local HTTPS upstream: tests/c/upstream_server.py
# prints its port and CA, and serves until its stdin closes.
echo "c: proxy"
coproc UPSTREAM { python3 tests/c/upstream_server.py; }
read -r port ca <&"${UPSTREAM[0]}"
# A real ssh-agent holding one generated key, for the SSH grant test.
ssh-agent -D -a "$scratch/agent.sock" >/dev/null 2>&1 &
agent_pid=$!
wait_for_socket "$scratch/agent.sock" ssh-agent
ssh-keygen -q -t ed25519 -N "" -C c-test@moat -f "$scratch/id_test"
SSH_AUTH_SOCK="$scratch/agent.sock" ssh-add -q "$scratch/id_test" 2>/dev/null
status=0
# Grants use the key file, never a developer's own keyring.
MOAT_KEYRING_BACKEND=file OPENAI_API_KEY= SSH_AUTH_SOCK="$scratch/agent.sock" \
  AWS_ACCESS_KEY_ID= AWS_SECRET_ACCESS_KEY= AWS_SHARED_CREDENTIALS_FILE=/nonexistent \
  "$out/test_proxy" "$scratch/proxy" "$port" "$ca" || status=$?
kill "$agent_pid" 2>/dev/null || true
echo "c: runs (${MOAT_RUNTIME:-docker}, ${MOAT_TEST_IMAGE:-moat-test:bookworm})"
mkdir -p "$scratch/run" "$scratch/run-ws"
# For the ssh: grant in a run: an ssh-agent with two keys, and a real sshd on
# loopback with its own host key, known to the run as git-c.test:22
# (MOAT_RESOLVE) and through a known_hosts file in a HOME of its own.
ssh-agent -D -a "$scratch/run-agent.sock" >/dev/null 2>&1 &
agent_pid=$!
wait_for_socket "$scratch/run-agent.sock" ssh-agent
mkdir -p "$scratch/sshd" "$scratch/ssh-home/.ssh"
[ -d /run/sshd ] || mkdir -p /run/sshd
for k in granted other; do
  ssh-keygen -q -t ed25519 -N "" -C "$k@c-test" -f "$scratch/sshd/$k"
  SSH_AUTH_SOCK="$scratch/run-agent.sock" ssh-add -q "$scratch/sshd/$k" 2>/dev/null
done
ssh-keygen -q -t ed25519 -N "" -f "$scratch/sshd/host_key"
cat "$scratch/sshd/granted.pub" "$scratch/sshd/other.pub" > "$scratch/sshd/authorized_keys"
# sshd on a free loopback port. A port found free can be taken before sshd
# binds it: then sshd exits, and another port is tried. sshd runs in the
# foreground here (-D, in the background of this script) and writes its
# PidFile once it listens: that is what is waited for (up to 30 s).
sshd_up=
for attempt in 1 2 3 4 5; do
  sshd_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rm -f "$scratch/sshd/pid" "$scratch/sshd/log"
  printf '%s\n' "ListenAddress 127.0.0.1:$sshd_port" "HostKey $scratch/sshd/host_key" \
    "AuthorizedKeysFile $scratch/sshd/authorized_keys" "StrictModes no" \
    "PasswordAuthentication no" "KbdInteractiveAuthentication no" "UsePAM no" \
    "PidFile $scratch/sshd/pid" "ForceCommand echo hello from c-sshd" > "$scratch/sshd/config"
  /usr/sbin/sshd -D -f "$scratch/sshd/config" -E "$scratch/sshd/log" &
  sshd_pid=$!
  for _ in $(seq 300); do
    if [ -s "$scratch/sshd/pid" ]; then sshd_up=1; break; fi
    kill -0 "$sshd_pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$sshd_up" ] && break
  kill "$sshd_pid" 2>/dev/null || true
  wait "$sshd_pid" 2>/dev/null || true
  echo "c: sshd did not listen on 127.0.0.1:$sshd_port (attempt $attempt):" \
    "$(cat "$scratch/sshd/log" 2>/dev/null)" >&2
done
if [ -z "$sshd_up" ]; then
  echo "c: sshd would not start; see above" >&2
  kill "$agent_pid" 2>/dev/null || true
  exit 1
fi
echo "git-c.test $(cut -d' ' -f1,2 "$scratch/sshd/host_key.pub")" > "$scratch/ssh-home/.ssh/known_hosts"
HOME="$scratch/ssh-home" SSH_AUTH_SOCK="$scratch/run-agent.sock" MOAT_TEST_SSH_HOST=git-c.test \
  MOAT_RESOLVE="git-c.test:22=127.0.0.1:$sshd_port" \
  "$out/test_run" "$scratch/run" "$profile_dir/moat" "${MOAT_TEST_IMAGE:-moat-test:bookworm}" "$scratch/run-ws" || status=$?
kill "$sshd_pid" "$agent_pid" 2>/dev/null || true

# Claude Code through the C ABI: the pinned build from the wheel setup.sh
# downloaded, against a local stand-in for Anthropic's API.
echo "c: claude (${MOAT_RUNTIME:-docker})"
wheel=$(ls "$root"/target/claude/claude_agent_sdk-*.whl 2>/dev/null | tail -1 || true)
if [ -z "$wheel" ]; then
  echo "no claude-agent-sdk wheel in target/claude: run bash scripts/setup.sh"
  status=1
else
  mkdir -p "$scratch/claude" "$scratch/claude-ws" "$scratch/standin"
  claude_key=sk-ant-api03-c-test-REAL-key-9F
  python3 tests/python/anthropic_standin.py --dir "$scratch/standin" --api-key "$claude_key" \
    > "$scratch/standin.out" 2>&1 &
  standin_pid=$!
  # Its first line, once it listens: "listening on 127.0.0.1:PORT; CA ...".
  # Up to 60 s (a slow machine); it failing to start is said, not skipped.
  sport=
  for _ in $(seq 600); do
    # (The file may not be there yet: the redirection is the job's own.)
    sport=$(sed -n '1s/^listening on [^:]*:\([0-9]*\);.*/\1/p' "$scratch/standin.out" \
      2>/dev/null || true)
    [ -n "$sport" ] && break
    kill -0 "$standin_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$sport" ]; then
    echo "c: the Anthropic stand-in did not start within 60 s; it said:" >&2
    cat "$scratch/standin.out" >&2
    status=1
  else
    MOAT_KEYRING_BACKEND=file MOAT_CLAUDE_WHEEL="$wheel" ANTHROPIC_API_KEY= \
      MOAT_UPSTREAM_CA_FILE="$scratch/standin/ca.pem" \
      MOAT_RESOLVE="api.anthropic.com:443=127.0.0.1:$sport,platform.claude.com:443=127.0.0.1:$sport" \
      "$out/test_claude" "$scratch/claude" "$profile_dir/moat" "${MOAT_TEST_IMAGE:-moat-test:bookworm}" \
      "$scratch/claude-ws" "$claude_key" || status=$?
  fi
  kill "$standin_pid" 2>/dev/null || true
fi
exec {UPSTREAM[1]}>&-
wait "$UPSTREAM_PID" 2>/dev/null || true
exit $status
