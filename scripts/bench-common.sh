# Shared by the proxy benchmarks (scripts/bench.sh, scripts/bench-soak.sh):
# a test CA and a *.bench.test certificate, and nginx on loopback.
# Source it; it defines functions only. Callers define `log` and `NGINX`.

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# bench_tls DIR: a test CA (DIR/ca.pem) and a *.bench.test server certificate
# (DIR/server-chain.pem, DIR/server.key), made once with openssl.
bench_tls() {
    local d=$1
    mkdir -p "$d"
    [ -s "$d/server-chain.pem" ] && return 0
    log "making a test CA and a *.bench.test certificate (openssl)"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$d/ca.key" -out "$d/ca.pem" -days 30 \
        -subj "/CN=moat-bench test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$d/server.key" -out "$d/server.csr" \
        -subj "/CN=bench.test" 2>/dev/null
    cat >"$d/server.ext" <<'EOF'
subjectAltName = DNS:*.bench.test, DNS:bench.test
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" \
        -CAcreateserial -days 30 -extfile "$d/server.ext" -out "$d/server.pem" 2>/dev/null
    cat "$d/server.pem" "$d/ca.pem" >"$d/server-chain.pem"
}

# bench_nginx WORK TLSDIR HTTP_PORT HTTPS_PORT STREAM_MIB [REVERSE_PORT]:
# nginx (2 workers) on 127.0.0.1, plain HTTP and HTTPS, serving WORK/www:
# /small (1 KiB), /big (a sparse STREAM_MIB file) and, over HTTPS, /headers
# (echoes the authorization header it received). With REVERSE_PORT, nginx
# is also a reverse proxy there to its own plain HTTP server (keep-alive
# upstream connections): a reference for what an efficient proxy costs on
# this machine. Sets NGINX_PID; stop it with bench_nginx_stop.
bench_nginx() {
    local work=$1 tlsd=$2 http_port=$3 https_port=$4 stream_mib=$5 reverse_port=${6:-}
    local reverse=""
    if [ -n "$reverse_port" ]; then
        reverse="upstream bench_back { server 127.0.0.1:$http_port; keepalive 64; }
    server {
        listen 127.0.0.1:$reverse_port;
        location / {
            proxy_pass http://bench_back;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
    fi
    # 1000 idle connections need about 2000 descriptors in each of the
    # client and the proxy.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
    local nofile
    nofile=$(ulimit -n)
    [ "$nofile" = unlimited ] && nofile=65536
    log "open files limit: $nofile"
    local ng=$work/nginx
    mkdir -p "$ng/tmp" "$work/www"
    head -c 1024 /dev/zero | tr '\0' 'x' >"$work/www/small"
    local want=$((stream_mib * 1024 * 1024))
    if [ "$(stat -c %s "$work/www/big" 2>/dev/null || echo 0)" != "$want" ]; then
        rm -f "$work/www/big"
        truncate -s "$want" "$work/www/big" # sparse: zeros from the page cache
    fi
    local user_line=""
    [ "$(id -u)" = 0 ] && user_line="user root;"
    cat >"$ng/nginx.conf" <<EOF
$user_line
worker_processes 2;
worker_rlimit_nofile $nofile;
pid $ng/nginx.pid;
error_log $ng/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path $ng/tmp/body;
    proxy_temp_path $ng/tmp/proxy;
    fastcgi_temp_path $ng/tmp/fastcgi;
    uwsgi_temp_path $ng/tmp/uwsgi;
    scgi_temp_path $ng/tmp/scgi;
    server {
        listen 127.0.0.1:$http_port;
        root $work/www;
    }
    server {
        listen 127.0.0.1:$https_port ssl;
        ssl_certificate $tlsd/server-chain.pem;
        ssl_certificate_key $tlsd/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        root $work/www;
        # Echoes the injected credential, so the suite can check injection.
        location = /headers {
            default_type text/plain;
            return 200 "authorization=\$http_authorization\\n";
        }
    }
    $reverse
}
EOF
    rm -f "$ng/nginx.pid"
    "$NGINX" -p "$ng" -c "$ng/nginx.conf" -e "$ng/error.log"
    for _ in $(seq 50); do
        [ -s "$ng/nginx.pid" ] && break
        sleep 0.1
    done
    NGINX_PID=$(cat "$ng/nginx.pid")
    log "nginx master pid $NGINX_PID on 127.0.0.1:$http_port (http) and :$https_port (https)"
}

bench_nginx_stop() {
    if [ -n "${NGINX_PID:-}" ]; then
        kill "$NGINX_PID" 2>/dev/null || true
    fi
}
