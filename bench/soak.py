"""The soak benchmark: one long-lived `moat.Proxy` (the facade a Python
harness keeps open all day), 1,000,000 requests over HTTPS and as many over
plain HTTP, in slices; requests/s, p99 and the proxy's memory per slice.

Run by scripts/bench-soak.sh, which starts nginx and builds what this needs.
Everything talks to 127.0.0.1 only: every name is *.bench.test, mapped with
`resolve`.

    python bench/soak.py --serve ...   # the proxy process (internal)
    python bench/soak.py --loader PATH --out FILE [options]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HTTPS_HOST = "soak.bench.test"
HTTP_HOST = "plain.bench.test"


def serve(args):
    """The proxy's own process, so that its memory is its own."""
    import moat

    resolve = {
        f"{HTTPS_HOST}:{args.https_port}": f"127.0.0.1:{args.https_port}",
        f"{HTTP_HOST}:{args.http_port}": f"127.0.0.1:{args.http_port}",
    }
    proxy = moat.Proxy(home=args.home, upstream_ca=args.upstream_ca, resolve=resolve,
                       name="soak")
    print(json.dumps({"url": proxy.url, "ca": proxy.ca_cert_path, "pid": os.getpid()}),
          flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            kept = len(proxy.trace())
            events = len(proxy.audit_events())
            print(json.dumps({"trace": kept, "events": events, "dropped": proxy.dropped}),
                  flush=True)
    proxy.close()


def pin(proxy_pid, nginx_pids, on):
    """Pins the proxy (all its threads) to its core and nginx to the
    others, or lets them all run anywhere again."""
    def set_all(pid, cores):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:
                pass
    set_all(proxy_pid, PROXY_CORE if on else CORES)
    for p in nginx_pids:
        set_all(p, OTHER_CORES if on else CORES)


def cpu_seconds(pid):
    """User and system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


# The slices run with the proxy alone on the last core and the load and
# nginx on the others, so that a slice measures the proxy, not how the
# scheduler shared two cores among three busy processes at that moment.
CORES = sorted(os.sched_getaffinity(0))
PROXY_CORE = CORES[-1:] if len(CORES) > 1 else CORES
OTHER_CORES = CORES[:-1] if len(CORES) > 1 else CORES


def load(loader, mode, url, requests, concurrency, proxy=None, ca=None, resolve=None,
         duration=None, pinned=False):
    cmd = [loader, "load", "--mode", mode, "--url", url, "--concurrency", str(concurrency),
           "--warmup", "0", "--timeout", "30"]
    if pinned:
        cmd = ["taskset", "-c", ",".join(map(str, OTHER_CORES))] + cmd
    if duration is None:
        cmd += ["--requests", str(requests), "--duration", "100000"]
    else:
        cmd += ["--duration", str(duration)]
    if proxy:
        cmd += ["--proxy", proxy]
    if ca:
        cmd += ["--ca", ca]
    for r in resolve or []:
        cmd += ["--resolve", r]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--home", required=True)
    ap.add_argument("--upstream-ca", required=True)
    ap.add_argument("--https-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--reverse-port", type=int,
                    help="nginx as a reverse proxy to the plain server: the reference")
    ap.add_argument("--loader", help="the moat-bench binary")
    ap.add_argument("--requests", type=int, default=1_000_000, help="per protocol")
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--windows", type=int, default=5,
                    help="turns per slice between the long-lived proxy and a fresh one")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out")
    ap.add_argument("--command", default="scripts/bench-soak.sh")
    ap.add_argument("--info", action="append", default=[])
    ap.add_argument("--nginx-pids", default="", help="nginx processes, pinned during the slices")
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return

    def start_proxy():
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--home", args.home,
             "--upstream-ca", args.upstream_ca, "--https-port", str(args.https_port),
             "--http-port", str(args.http_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return child, json.loads(child.stdout.readline())

    def slice_against_fresh(target, requests, windows):
        """`requests` through the long-lived proxy in `windows` parts, each
        followed by half as many through a new proxy process, started and
        pinned as the long-lived one was, on the same core: the machine's
        speed at that moment, for a proxy that has served nothing. The two
        take turns every second or so, so the drift of a shared machine,
        which moves over seconds, falls on both alike."""
        ref, ref_hello = start_proxy()
        aged = {"requests": 0, "secs": 0.0, "p99": 0.0}
        fresh = {"requests": 0, "secs": 0.0, "cpu": 0.0}
        try:
            pin(ref_hello["pid"], nginx, True)
            for _ in range(windows):
                r = load(args.loader, "proxy", target, requests // windows, args.concurrency,
                         proxy=url, ca=ca, pinned=True)
                if r["errors"]:
                    raise SystemExit(f"{target}: {r['errors']} errors through the long-lived "
                                     f"proxy, first: {r['first_error']}")
                aged["requests"] += r["requests"]
                aged["secs"] += r["requests"] / r["rps"]
                aged["p99"] = max(aged["p99"], r["p99_ms"])
                cpu_before = cpu_seconds(ref_hello["pid"])
                f = load(args.loader, "proxy", target, max(requests // windows // 2, 500),
                         args.concurrency, proxy=ref_hello["url"], ca=ref_hello["ca"],
                         pinned=True)
                fresh["cpu"] += cpu_seconds(ref_hello["pid"]) - cpu_before
                fresh["requests"] += f["requests"]
                fresh["secs"] += f["requests"] / f["rps"]
        finally:
            ref.stdin.close()
            ref.wait(timeout=60)
        return (aged["requests"] / aged["secs"], aged["p99"], aged["requests"],
                fresh["requests"] / fresh["secs"], fresh["requests"],
                fresh["cpu"] / fresh["requests"] * 1e6)

    nginx = [int(p) for p in args.nginx_pids.split(",") if p]
    child, hello = start_proxy()
    try:
        pid, url, ca = hello["pid"], hello["url"], hello["ca"]
        per_slice = args.requests // args.slices
        started = rss_mib(pid)
        results = {}
        reference = None
        if args.reverse_port:
            rp = args.reverse_port
            reference = load(args.loader, "direct", f"http://{HTTP_HOST}:{rp}/small", 0,
                             args.concurrency, resolve=[f"{HTTP_HOST}:{rp}=127.0.0.1:{rp}"],
                             duration=5)
        for proto, host, port in (("HTTPS", HTTPS_HOST, args.https_port),
                                  ("plain HTTP", HTTP_HOST, args.http_port)):
            scheme = "https" if proto == "HTTPS" else "http"
            target = f"{scheme}://{host}:{port}/small"
            # Direct, for the ratio: the same server, no proxy, 5 s.
            direct = load(args.loader, "direct", target, 0, args.concurrency,
                          ca=args.upstream_ca, resolve=[f"{host}:{port}=127.0.0.1:{port}"],
                          duration=5)
            # Through the proxy, every process on every core as direct ran,
            # 5 s: the ratio against direct.
            fresh = load(args.loader, "proxy", target, 0, args.concurrency, proxy=url, ca=ca,
                         duration=5)
            rows = []
            pin(pid, nginx, True)
            try:
                for i in range(args.slices):
                    cpu_before = cpu_seconds(pid)
                    rps, p99, done, fresh_rps, fresh_done, fresh_cpu_us = slice_against_fresh(
                        target, per_slice, args.windows)
                    # The long-lived proxy idles while the fresh one serves.
                    cpu = cpu_seconds(pid) - cpu_before
                    # CPU per request over every request of the slice.
                    rows.append({"rps": rps, "p99": p99, "rss": rss_mib(pid),
                                 "requests": done, "cpu_us": cpu / done * 1e6,
                                 "fresh": fresh_rps, "fresh_requests": fresh_done,
                                 "fresh_cpu_us": fresh_cpu_us, "rel": rps / fresh_rps})
                    print(f"[soak] {proto} slice {i + 1}/{args.slices}: {rps:.0f} req/s, "
                          f"a fresh proxy in turns with it {fresh_rps:.0f} req/s, "
                          f"p99 {p99:.2f} ms, {rows[-1]['cpu_us']:.1f} us CPU/request, "
                          f"proxy RSS {rows[-1]['rss']:.1f} MiB", file=sys.stderr, flush=True)
            finally:
                pin(pid, nginx, False)

            results[proto] = {"direct": direct, "rows": rows, "fresh": fresh}
        child.stdin.write("stats\n")
        child.stdin.flush()
        stats = json.loads(child.stdout.readline())
    finally:
        child.stdin.close()
        child.wait(timeout=60)

    lines = ["# Soak benchmark", "",
             f"Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: "
             f"`{args.command}`. One `moat.Proxy` (the Python facade, its own process) "
             f"serves {args.requests:,} requests over HTTPS and then {args.requests:,} over "
             f"plain HTTP, keep-alive, concurrency {args.concurrency}, against nginx on "
             f"loopback (a 1 KiB file), in slices of {per_slice:,}. RSS is the proxy "
             f"process's after each slice (at start: {started:.1f} MiB).", "",
             f"Each slice is served in {args.windows} parts, and after each part a new "
             "proxy process, started and pinned to the same core as the long-lived one, "
             "serves half as many requests: the rate a proxy that has served nothing gets on "
             "this machine at that moment. A shared virtual machine's speed drifts by tens "
             "of percent over seconds and minutes; taking turns every second or so puts the "
             "same drift on both, and the long-lived proxy's rate ÷ the fresh one's "
             "(\"÷ fresh\") removes most of it: a proxy slowing with age would fall below 1 "
             "and stay there. A slice's p99 is the worst of its parts'.", ""]
    lines += [f"- {i}" for i in args.info] + [""]
    summary = []
    for proto, res in results.items():
        rows = res["rows"]
        first = rows[0]["rps"]
        worst = min(r["rps"] for r in rows)
        grow = rows[-1]["rss"] - rows[1]["rss"] if len(rows) > 1 else 0.0
        d = res["direct"]
        summary.append((proto, first, worst, worst / first, d, grow, rows))
        refline = ""
        if reference and proto == "plain HTTP":
            refline = (f" nginx as a reverse proxy to the same server, keep-alive upstream "
                       f"(5 s): {reference['rps']:.0f} req/s "
                       f"({reference['rps'] / d['rps']:.2f}× direct), p99 "
                       f"{reference['p99_ms']:.2f} ms.")
        lines += [f"## {proto}", "",
                  f"Direct (no proxy, 5 s): {d['rps']:.0f} req/s, p99 {d['p99_ms']:.2f} ms."
                  + refline, "",
                  f"Through the proxy before the slices, 5 s, every process on every core "
                  f"as direct ran: {res['fresh']['rps']:.0f} req/s "
                  f"({res['fresh']['rps'] / d['rps']:.2f}× direct), p99 "
                  f"{res['fresh']['p99_ms']:.2f} ms. The slices, with the proxy alone on core "
                  f"{PROXY_CORE[0]} and the load and nginx on the rest:", "",
                  "| slice | req/s | ÷ first | fresh proxy req/s (in turns) | ÷ fresh | "
                  "proxy CPU µs per request | fresh proxy's | p99 ms | proxy RSS MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i, r in enumerate(rows):
            lines.append(f"| {i + 1} | {r['rps']:.0f} | {r['rps'] / first:.2f} | "
                         f"{r['fresh']:.0f} | {r['rel']:.2f} | "
                         f"{r['cpu_us']:.1f} | {r['fresh_cpu_us']:.1f} | "
                         f"{r['p99']:.2f} | {r['rss']:.1f} |")
        lines.append("")
    lines += ["## Goals", "",
              "| measure | goal | measured |", "| --- | --- | --- |"]
    for proto, first, worst, ratio, d, grow, rows in summary:
        cpus = [r["cpu_us"] for r in rows]
        lines.append(f"| {proto}: worst slice ÷ first | ≥ 0.9 | "
                     f"{ratio:.2f} ({worst:.0f} / {first:.0f} req/s) |")
        rel = [r["rel"] for r in rows]
        half = len(rel) // 2
        lines.append(f"| {proto}: each slice ÷ a fresh proxy taking turns with it "
                     f"(the machine's drift removed) | ≥ 0.9 | worst {min(rel):.2f} "
                     f"(slice {rel.index(min(rel)) + 1}), median {sorted(rel)[half]:.2f}; "
                     f"first half's median {sorted(rel[:half])[half // 2]:.2f}, second half's "
                     f"{sorted(rel[half:])[(len(rel) - half) // 2]:.2f} |")
        lines.append(f"| {proto}: proxy CPU per request, last slice ÷ first | not growing | "
                     f"{cpus[-1] / cpus[0]:.2f} ({cpus[0]:.1f} → {cpus[-1]:.1f} µs; "
                     f"range {min(cpus):.1f}–{max(cpus):.1f}) |")
        cpu_rel = [r["cpu_us"] / r["fresh_cpu_us"] for r in rows if r["fresh_cpu_us"] > 0]
        if cpu_rel:
            lines.append(f"| {proto}: proxy CPU per request ÷ the fresh proxy's, in turns "
                         f"(the machine's drift removed) | not growing | "
                         f"first slice {cpu_rel[0]:.2f}, last {cpu_rel[-1]:.2f}, median "
                         f"{sorted(cpu_rel)[len(cpu_rel) // 2]:.2f}, range "
                         f"{min(cpu_rel):.2f}–{max(cpu_rel):.2f} |")
        lines.append(f"| {proto}: RSS change from slice 2 to slice {len(rows)} | flat | "
                     f"{grow:+.1f} MiB ({rows[1]['rss']:.1f} → {rows[-1]['rss']:.1f}) |")
    https, plain = summary[0], summary[1]
    ref = ""
    if reference:
        ref = (f" (nginx as a reverse proxy, the same run: "
               f"{reference['rps'] / plain[4]['rps']:.2f})")
    pf, hf = results["plain HTTP"]["fresh"], results["HTTPS"]["fresh"]
    lines.append(f"| plain HTTP, fresh proxy ÷ direct req/s | ≥ 0.6 | "
                 f"{pf['rps'] / plain[4]['rps']:.2f}{ref} |")
    lines.append(f"| plain HTTP p99 below HTTPS p99 (those 5 s runs) | yes | "
                 f"{pf['p99_ms']:.2f} vs {hf['p99_ms']:.2f} ms |")
    lines += ["",
              f"At the end the proxy kept {stats['trace']:,} trace records and "
              f"{stats['events']:,} audit events in memory and had dropped "
              f"{stats['dropped'][0]:,} and {stats['dropped'][1]:,} "
              f"(`trace_limit`, `trace_bytes`).", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
