#!/usr/bin/env python3
"""Costs per delivery of a fan-out, for ringcast and Bun side by side: system calls and socket
writes submitted through io_uring (perf stat on tracepoints, which barely slows the server; or
strace -c, which does and sees no io_uring requests) and, for ringcast,
instructions (valgrind --tool=callgrind).

Each figure is a difference of two runs on fresh servers: the same subscribers with P publishes
minus the same subscribers with none, divided by the deliveries (P x subscribers). So the
handshakes, the ramp and the start-up cancel out and what remains is the fan-out.

usage: bench/profile.py [--peers bun,ringcast] [--subscribers 2000] [--publishes 400] [--rate 100]
                        [--tool perf|strace|callgrind] [--no-install]
"""
import argparse, json, os, re, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from compare import Peer, install  # noqa: E402


def strace_counts(path):
    """{syscall: calls} from an `strace -c` summary."""
    calls = {}
    for line in open(path):
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) >= 5 and re.match(r"^\d+\.\d+$", f[0]) and f[-1] != "total":
            calls[f[-1]] = int(f[3])
    return calls


PERF_EVENTS = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in (
    "sendmsg", "sendto", "write", "writev", "recvfrom", "read", "io_uring_enter", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "futex")]


# Socket writes a server submits through io_uring instead of as system calls (IORING_OP_SENDMSG
# 9, IORING_OP_SEND 26): counted so that batching writes into one io_uring_enter is not mistaken
# for making fewer writes.
URING_SENDS = ["-e", "io_uring:io_uring_submit_req", "--filter", "opcode == 9 || opcode == 26"]


def perf_counts(path):
    """{event: count} from `perf stat -x,` output."""
    calls = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) >= 3 and f[0].isdigit():
            name = (f[2].replace("syscalls:sys_enter_", "")
                    .replace("raw_syscalls:sys_enter", "all system calls")
                    .replace("io_uring:io_uring_submit_req", "socket writes via io_uring"))
            calls[name] = int(f[0])
    return calls


def run(peer_name, a, publishes, tmp):
    """Starts the peer under the tool, drives it with the load generator, stops it; returns the
    tool's counts."""
    out = os.path.join(tmp, f"{peer_name}-{publishes}")
    wrap = {"perf": ["perf", "stat", "-x,", "-o", out + ".perf"] + [x for e in PERF_EVENTS for x in ("-e", e)]
            + URING_SENDS,
            "strace": ["strace", "-f", "-c", "-o", out + ".strace"],
            "callgrind": ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.cg.%p",
                          "--trace-children=no"]}[a.tool]
    peer = Peer(peer_name)
    # Peer.start runs the server directly: wrap its command in the tool's.
    real_popen = subprocess.Popen

    def popen(cmd, *args, **kw):
        if isinstance(cmd, list) and not cmd[0].endswith("nginx"):
            cmd = wrap + cmd
        return real_popen(cmd, *args, **kw)

    subprocess.Popen = popen
    try:
        peer.start()
    finally:
        subprocess.Popen = real_popen
    try:
        rate = a.rate
        cmd = [compare.LOADGEN] + peer.flags + ["--threads", "2", "--out", out + "-lg", "fanout",
                                                "--subscribers", str(a.subscribers), "--rate", str(rate),
                                                "--size", "100", "--duration", str(publishes / rate if publishes else 0.01),
                                                "--publishers", "4"] + peer.publish
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-1500:])
        summary = json.loads(r.stdout)
    finally:
        # Stop the server, not the tool: strace and valgrind write their summary once the
        # process they run has exited.
        for p in peer.procs:
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            for k in kids or [str(p.pid)]:
                subprocess.run(["kill", "-TERM", k])
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    if a.tool == "perf":
        counts = perf_counts(out + ".perf")
    elif a.tool == "strace":
        counts = strace_counts(out + ".strace")
    else:
        counts = {}
        for f in os.listdir(tmp):
            if f.startswith(os.path.basename(out) + ".cg."):
                text = open(os.path.join(tmp, f)).read()
                m = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
                counts["instructions"] = counts.get("instructions", 0) + int(m.group(1))
    return counts, summary["published"], summary["subscribers"]["connected"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="bun,ringcast")
    ap.add_argument("--subscribers", type=int, default=2000)
    ap.add_argument("--publishes", type=int, default=400)
    ap.add_argument("--rate", type=float, default=100, help="publishes per second")
    ap.add_argument("--ringcast", default=compare.RINGCAST, help="the ringcast binary (default: this build's)")
    ap.add_argument("--tool", default="perf", choices=["perf", "strace", "callgrind"])
    ap.add_argument("--no-install", action="store_true")
    a = ap.parse_args()
    compare.RINGCAST = a.ringcast
    if not a.no_install:
        install()
    tmp = tempfile.mkdtemp(prefix="rc-profile-")
    rows = []
    for name in a.peers.split(","):
        base, pub_base, _ = run(name, a, 0, tmp)
        full, pub_full, subs = run(name, a, a.publishes, tmp)
        deliveries = (pub_full - pub_base) * subs
        per = {k: (full.get(k, 0) - base.get(k, 0)) / max(1, deliveries) for k in set(full) | set(base)}
        rows.append((name, deliveries, per))
        print(json.dumps({"peer": name, "deliveries": deliveries, "per_delivery": per}), file=sys.stderr)
    print(f"\n{a.tool}: per delivery, {a.subscribers} subscribers x {a.publishes} publishes, "
          "(run with publishes - run without) / deliveries\n")
    keys = sorted({k for _, _, per in rows for k, v in per.items() if abs(v) >= 0.01},
                  key=lambda k: -max(abs(per.get(k, 0)) for _, _, per in rows))
    print("| per delivery | " + " | ".join(n for n, _, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    if a.tool == "strace":
        print("| all system calls (traced) | " + " | ".join(f"{sum(per.values()):.3f}" for _, _, per in rows) + " |")
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{per.get(k, 0):.3f}" for _, _, per in rows) + " |")


if __name__ == "__main__":
    main()
