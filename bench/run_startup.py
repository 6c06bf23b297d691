#!/usr/bin/env python3
"""Run start-up benchmark: `moat run -- true` against `docker run --rm IMAGE
true` on the same image, interleaved, N runs each, in one run of this script.

Usage: python3 bench/run_startup.py MOAT_BINARY [--image IMAGE] [--runs N] [--out FILE]

Reports medians and p90 of wall time, the time moat adds at the median, and
where moat's time goes: the phases its supervisor records in run.json
(image check, network, proxy, container create + file setup, start), and the
rest (supervisor start, waiting for exit, cleanup of container and network).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(cmd, env=None):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return (time.perf_counter() - t) * 1000


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("moat")
    ap.add_argument("--image", default=os.environ.get("MOAT_TEST_IMAGE", "moat-test:bookworm"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    home = tempfile.mkdtemp(prefix="moat-bench-home-")
    ws = tempfile.mkdtemp(prefix="moat-bench-ws-")
    env = {**os.environ, "MOAT_HOME": home}
    # Warm both paths once (image cache, CA creation).
    timed([a.moat, "run", "--image", a.image, ws, "--", "true"], env)
    timed(["docker", "run", "--rm", a.image, "true"])
    moat, docker = [], []
    for _ in range(a.runs):
        docker.append(timed(["docker", "run", "--rm", a.image, "true"]))
        moat.append(timed([a.moat, "run", "--image", a.image, ws, "--", "true"], env))
    phases = {}
    for d in os.listdir(os.path.join(home, "runs")):
        path = os.path.join(home, "runs", d, "run.json")
        if os.path.exists(path):
            with open(path) as f:
                for k, v in json.load(f).get("phases", {}).items():
                    phases.setdefault(k, []).append(v)
    subprocess.run([a.moat, "clean", "-f"], env=env, check=True, stderr=subprocess.DEVNULL)
    added = statistics.median(moat) - statistics.median(docker)
    lines = [
        f"# Run start-up: `moat run -- true` vs `docker run --rm {a.image} true`",
        "",
        f"{a.runs} runs each, interleaved, one run of `scripts/bench-run.sh` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores).",
        "",
        "| command | median ms | p90 ms | min ms |",
        "| --- | ---: | ---: | ---: |",
        f"| docker run --rm | {statistics.median(docker):.0f} | {pct(docker, 90):.0f} | {min(docker):.0f} |",
        f"| moat run | {statistics.median(moat):.0f} | {pct(moat, 90):.0f} | {min(moat):.0f} |",
        "",
        f"moat adds **{added:.0f} ms** at the median (goal: at most 250 ms); "
        f"ratio {statistics.median(moat) / statistics.median(docker):.2f}x.",
        "",
        "Where moat's setup time goes (median over the runs, from run.json `phases`):",
        "",
        "| phase | median ms |",
        "| --- | ---: |",
    ]
    setup_phases = ["image", "network", "proxy", "firewall", "files", "create", "attach", "start"]
    for k in setup_phases:
        if k in phases:
            lines.append(f"| {k} | {statistics.median(phases[k]):.1f} |")
    setup = sum(statistics.median(v) for k, v in phases.items() if k in setup_phases)
    lines += [
        f"| (setup, sum of the above) | {setup:.1f} |",
        f"| rest: processes, the command, exit, artifacts final | {statistics.median(moat) - setup:.1f} |",
        "",
    ]
    if "cleanup" in phases:
        lines += [
            f"After the exit code is known, `moat run` returns and the run's supervisor removes "
            f"the container, the firewall rules and the network: {statistics.median(phases['cleanup']):.0f} ms "
            "at the median, not in moat's wall time above (`docker run --rm` waits for its "
            "container's removal). `moat stop`, `moat destroy` and `moat clean` wait for it.",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
