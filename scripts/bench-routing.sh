#!/usr/bin/env bash
# Routing benchmark in one command: requests per second and latency through
# the routing proxy (http://web.bench.localhost:PORT) against the same
# endpoint directly, one run, on loopback only. The endpoint is nginx (from
# Debian) serving a 1 KiB file; the route is written to a temporary moat
# home's route table as a run would. Writes bench/ROUTING_RESULTS.md.
#   scripts/bench-routing.sh [--duration SECONDS]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DURATION=5
[ "${1:-}" = "--duration" ] && DURATION=$2
log() { printf '[bench-routing] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then
    log "installing nginx (Debian)"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends nginx >/dev/null
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi
cargo build -q --release -p moat-cli -p moat-bench
MOAT=$ROOT/target/release/moat
BENCH=$ROOT/target/release/moat-bench

WORK=$(mktemp -d)
chmod 755 "$WORK"  # nginx workers run as another user
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NG_PORT=$(port); ROUTER_PORT=$(port)
mkdir -p "$WORK/nginx/www" "$WORK/home/proxy"
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/nginx/www/1k"
cat > "$WORK/nginx/nginx.conf" <<NGX
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$NG_PORT; root $WORK/nginx/www; }
}
NGX
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
# The issue's comparison: the same nginx (the host's binary, mounted) in a
# container of the test image, reached through its published port (Docker's
# userland proxy on 127.0.0.1) and through the router at the container's
# address, as a run's endpoint is.
bash scripts/build-test-image.sh >&2
PUB_PORT=$(port)
CONTAINER=moat-bench-nginx-$$
chmod 644 "$WORK/nginx/www/1k"
cat > "$WORK/nginx/container.conf" <<'NGX'
user nobody nogroup;
worker_processes 1;
pid /tmp/nginx.pid;
error_log stderr;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path /tmp/body; proxy_temp_path /tmp/proxy; fastcgi_temp_path /tmp/fcgi;
  uwsgi_temp_path /tmp/uwsgi; scgi_temp_path /tmp/scgi;
  server { listen 80; root /www; }
}
NGX
docker run -d --rm --name "$CONTAINER" -p "127.0.0.1:$PUB_PORT:80" \
    -v "$NGINX:/usr/sbin/nginx:ro" -v "$WORK/nginx/www:/www:ro" \
    -v "$WORK/nginx/container.conf:/etc/moat-nginx.conf:ro" \
    moat-test:bookworm /usr/sbin/nginx -c /etc/moat-nginx.conf -g 'daemon off;' >/dev/null
CONTAINER_IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$CONTAINER")
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PUB_PORT/1k" >/dev/null && break; sleep 0.1; done
cleanup() {
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    [ -n "${ROUTER_PID:-}" ] && kill "$ROUTER_PID" 2>/dev/null || true
    [ -s "$WORK/nginx/nginx.pid" ] && kill "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
printf '{"agents":{"bench":{"run":"run_00000000bbbb","endpoints":{"web":"127.0.0.1:%s"}},"benchc":{"run":"run_00000000cccc","endpoints":{"web":"%s:80"}}}}' \
    "$NG_PORT" "$CONTAINER_IP" > "$WORK/home/proxy/routes.json"
MOAT_HOME=$WORK/home "$MOAT" _router --port "$ROUTER_PORT" 2>"$WORK/router.log" &
ROUTER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/home/proxy/router.json" ] && break; sleep 0.05; done

load() { # name url concurrency [extra...]
    local name=$1 url=$2 c=$3; shift 3
    "$BENCH" load --mode direct --url "$url" --concurrency "$c" --duration "$DURATION" --warmup 1 "$@" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); print('$name', $c, r['rps'], r['p50_ms'], r['p99_ms'], r['errors'])"
}
NAME=web.bench.localhost
CNAME=web.benchc.localhost
{
for c in 1 16; do
    load direct "http://127.0.0.1:$NG_PORT/1k" $c
    load router "http://$NAME:$ROUTER_PORT/1k" $c --resolve "$NAME:$ROUTER_PORT=127.0.0.1:$ROUTER_PORT"
    load router-https "https://$NAME:$ROUTER_PORT/1k" $c --resolve "$NAME:$ROUTER_PORT=127.0.0.1:$ROUTER_PORT" \
        --ca "$WORK/home/proxy/ca/ca.crt" --resume
    load published "http://127.0.0.1:$PUB_PORT/1k" $c
    load router-container "http://$CNAME:$ROUTER_PORT/1k" $c --resolve "$CNAME:$ROUTER_PORT=127.0.0.1:$ROUTER_PORT"
    load router-container-https "https://$CNAME:$ROUTER_PORT/1k" $c --resolve "$CNAME:$ROUTER_PORT=127.0.0.1:$ROUTER_PORT" \
        --ca "$WORK/home/proxy/ca/ca.crt" --resume
done
} > "$WORK/results.txt"
python3 - "$WORK/results.txt" "$DURATION" <<'PY'
import sys, time, os
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
res = {(r[0], int(r[1])): tuple(map(float, r[2:6])) for r in rows}
out = ["# Routing proxy: through `<endpoint>.<agent>.localhost` against the endpoint directly", "",
       f"One run of `scripts/bench-routing.sh` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
       f"{os.cpu_count()} cores, {sys.argv[2]} s per point, keep-alive clients, a 1 KiB file from nginx).", "",
       "Goal (#7): through the router at least 0.6x the requests per second of the container's "
       "published port, and at most 1 ms added at p99.", ""]
def table(title, base, names):
    out.extend([title, "",
                f"| path | conc. | req/s | p50 ms | p99 ms | errors | req/s ÷ {base} | p99 added ms |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"])
    for c in (1, 16):
        d = res[(base, c)]
        for name in names:
            r = res[(name, c)]
            out.append(f"| {name} | {c} | {r[0]:.0f} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.0f} | "
                       f"{r[0]/d[0]:.2f} | {r[2]-d[2]:+.3f} |")
    out.append("")
table("## The issue's comparison: nginx in a container, its published port (Docker's userland proxy) "
      "against the router to the container's address", "published",
      ("published", "router-container", "router-container-https"))
table("## Stricter: nginx on loopback, directly against the router", "direct",
      ("direct", "router", "router-https"))
text = "\n".join(out)
print(text)
open("bench/ROUTING_RESULTS.md", "w").write(text)
PY
