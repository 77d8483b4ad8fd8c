"""``python -m bench``: speed and scale as ratios measured side by side in one run.

Every figure is divided by a baseline measured in the same run, on the same
interpreter, interleaved with it where that makes sense, so machine noise
largely cancels out. ``--quick`` runs reduced sizes in under a minute;
``--json FILE`` writes the table to FILE as well.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass

from bench.common import (env_for, median, rss_kib, state_dir, timed, write_log, write_pods,
                          yoi, yoi_argv)

PY = sys.executable


@dataclass
class Row:
    case: str
    figure: float | None
    baseline: float | None
    unit: str
    ratio: float | None
    target: str
    status: str
    note: str = ""


def judge(case, figure, baseline, unit, target_op, target, note="") -> Row:
    ratio = figure / baseline
    ok = ratio <= target if target_op == "<=" else ratio >= target
    return Row(case, figure, baseline, unit, ratio, f"{target_op} {target}",
               "PASS" if ok else "MISS", note)


def interleaved(a_argv, b_argv, n, env=None):
    """Alternate A and B n times each; return (median A, median B) in seconds."""
    ta, tb = [], []
    timed(a_argv, env), timed(b_argv, env)  # warm the page cache
    for _ in range(n):
        ta.append(timed(a_argv, env))
        tb.append(timed(b_argv, env))
    return median(ta), median(tb)


IMPORT_CLICK = [PY, "-c", "import click"]


# -- cases -------------------------------------------------------------------

def case_startup(quick):
    n = 10 if quick else 25
    with state_dir() as st:
        a, b = interleaved(yoi_argv() + ["--version"], IMPORT_CLICK, n, env_for(st))
    return judge("startup", a * 1000, b * 1000, "ms", "<=", 1.25,
                 "yoi --version / python -c 'import click'")


class LivePods:
    """Start Pods for a case and always stop them."""

    def __init__(self, st, env):
        self.st, self.env, self.names = st, env, []

    def start(self, name):
        yoi("pod", "start", name, env=self.env, timeout=60)
        self.names.append(name)

    def pid(self, name):
        out = yoi("pod", "status", name, "--json", env=self.env).stdout
        return json.loads(out)["pid"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for name in self.names:
            yoi("pod", "stop", name, "--force", "--timeout", "5", env=self.env, check=False)


def make_peers_a_b(env) -> None:
    for name in ("A", "B"):
        yoi("pod", "create", name, env=env)
    yoi("pod", "peer", "register", "A", "B", env=env)


def case_one_shot_send(quick):
    n = 10 if quick else 25
    with state_dir() as st:
        env = env_for(st)
        make_peers_a_b(env)
        with LivePods(st, env) as pods:
            pods.start("B")
            a, b = interleaved(yoi_argv() + ["pod", "send", "--from", "A", "B", "msg"],
                               IMPORT_CLICK, n, env)
    return judge("one-shot send", a * 1000, b * 1000, "ms", "<=", 1.6,
                 "yoi pod send --from A B (acknowledged) / python -c 'import click'")


def case_streamed_send(quick):
    n = 2000 if quick else 20000
    lines = "".join(f"message number {i} with some text\n" for i in range(n))
    with state_dir() as st:
        env = env_for(st)
        make_peers_a_b(env)
        with LivePods(st, env) as pods:
            pods.start("B")
            t0 = time.perf_counter()
            yoi("pod", "send", "--lines", "--from", "A", "B", "-", env=env, input=lines,
                timeout=600)
            send_rate = n / (time.perf_counter() - t0)
        path = st / "fsync-loop.txt"
        t0 = time.perf_counter()
        with open(path, "ab") as f:
            for line in lines.splitlines(keepends=True):
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())
        loop_rate = n / (time.perf_counter() - t0)
    return judge("streamed send", send_rate, loop_rate, "msg/s", ">=", 1.0,
                 f"{n} lines via --lines / write+fsync per line loop")


def case_peer_register(quick):
    n = 10 if quick else 25
    with state_dir() as st:
        env = env_for(st)
        write_pods(st, [f"p{i}" for i in range(2 * (n + 1))], lambda _: [])
        reg, ver = [], []
        for i in range(n + 1):
            t_reg = timed(yoi_argv() + ["pod", "peer", "register", f"p{2*i}", f"p{2*i+1}"], env)
            t_ver = timed(yoi_argv() + ["--version"], env)
            if i:  # the first pair warms caches
                reg.append(t_reg)
                ver.append(t_ver)
    return judge("peer register", median(reg) * 1000, median(ver) * 1000, "ms", "<=", 1.3,
                 "yoi pod peer register (new pair) / yoi --version")


def case_list_hung(quick):
    from yoi.discovery import PROBE_TIMEOUT
    total, hung = (200, 20) if quick else (1000, 100)
    held = []
    with state_dir() as st:
        env = env_for(st)
        names = [f"pod{i:04d}" for i in range(total)]
        write_pods(st, names, lambda _: [])
        (st / "run").mkdir(mode=0o700)
        try:
            for name in names[:hung]:
                # A hung Pod: holds its runtime lock and a listening socket, never answers.
                fd = os.open(st / "pods" / name / "runtime.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(st / "run" / f"{name}.sock"))
                s.listen(16)
                held.append((fd, s))
            t = timed(yoi_argv() + ["pod", "list"], env)
        finally:
            for fd, s in held:
                s.close()
                os.close(fd)
    return judge("list with hung Pods", t, PROBE_TIMEOUT, "s", "<=", 3,
                 f"yoi pod list over {total} Pods, {hung} hung / probe timeout")


def _ring_peers(n, k):
    def peers_of(name):
        i = int(name[1:])
        return [f"p{(i + d) % n:05d}" for d in range(-k, k + 1) if d]
    return peers_of


def case_doctor_scale(quick):
    pods, k = (1000, 5) if quick else (10000, 5)
    with state_dir() as st:
        env = env_for(st)
        write_pods(st, [f"p{i:05d}" for i in range(pods)], _ring_peers(pods, k))
        loop = ("import os,tomllib,sys\n"
                "d=sys.argv[1]+'/pods'\n"
                "for n in os.listdir(d):\n"
                "    with open(os.path.join(d,n,'metadata.toml'),'rb') as f: tomllib.load(f)\n")
        t_base = timed([PY, "-c", loop, str(st)], env)
        t_doc = timed(yoi_argv() + ["doctor"], env)
        t_base = min(t_base, timed([PY, "-c", loop, str(st)], env))
        t_doc = min(t_doc, timed(yoi_argv() + ["doctor"], env))
    return judge("doctor at scale", t_doc, t_base, "s", "<=", 2.5,
                 f"yoi doctor over {pods} Pods / {pods * k} relations vs read+tomllib loop")


def case_log_size(quick):
    entries = 10000 if quick else 100000
    n = 8 if quick else 20
    with state_dir() as st:
        env = env_for(st)
        for name in ("big", "empty"):
            yoi("pod", "create", name, env=env)
        write_log(st / "pods" / "big" / "session.jsonl", entries)
        with LivePods(st, env) as pods:
            pods.start("big")
            pods.start("empty")
            a, b = interleaved(yoi_argv() + ["pod", "send", "big", "hello"],
                               yoi_argv() + ["pod", "send", "empty", "hello"], n, env)
    return judge("log size", a * 1000, b * 1000, "ms", "<=", 1.2,
                 f"send to a Pod with {entries} log entries / to an empty log")


def case_idle_connections(quick):
    from yoi.client import Connection
    conns = 50 if quick else 200
    with state_dir() as st:
        env = env_for(st)
        yoi("pod", "create", "idle", env=env)
        with LivePods(st, env) as pods:
            pods.start("idle")
            pid = pods.pid("idle")
            sock = json.loads(yoi("pod", "status", "idle", "--json", env=env).stdout)["live"]["socket_path"]
            time.sleep(0.5)
            base = rss_kib(pid)
            held = []
            try:
                for _ in range(conns):
                    held.append(Connection.open(sock, 10))
                time.sleep(0.5)
                loaded = rss_kib(pid)
            finally:
                for c in held:
                    c.close()
    return judge("idle connections", loaded, base, "KiB", "<=", 1.5,
                 f"Pod RSS with {conns} idle clients / idle")


def case_history_rss(quick):
    """A Pod's memory after it has logged many messages vs a fresh Pod's."""
    n = 20000 if quick else 200000
    lines = "".join(f"message {i}\n" for i in range(n))
    with state_dir() as st:
        env = env_for(st)
        for name in ("busy", "fresh"):
            yoi("pod", "create", name, env=env)
        with LivePods(st, env) as pods:
            pods.start("busy")
            pods.start("fresh")
            yoi("pod", "send", "--lines", "busy", "-", env=env, input=lines, timeout=600)
            time.sleep(0.5)
            busy, fresh = rss_kib(pods.pid("busy")), rss_kib(pods.pid("fresh"))
    return judge("history RSS", busy, fresh, "KiB", "<=", 1.3,
                 f"Pod RSS after {n} logged messages / a fresh Pod")


def case_start_with_history(quick):
    """Start-up time of a Pod with a long log (its index built) vs an empty one."""
    entries = 100000 if quick else 1000000
    n = 5 if quick else 10
    with state_dir() as st:
        env = env_for(st)
        for name in ("long", "empty"):
            yoi("pod", "create", name, env=env)
        write_log(st / "pods" / "long" / "session.jsonl", entries)
        yoi("pod", "start", "long", "--timeout", "600", env=env)  # builds the index once
        yoi("pod", "stop", "long", env=env)
        ta, tb = [], []
        for _ in range(n):
            for name, times in (("long", ta), ("empty", tb)):
                t0 = time.perf_counter()
                yoi("pod", "start", name, env=env)
                times.append(time.perf_counter() - t0)
                yoi("pod", "stop", name, env=env)
    return judge("start with history", median(ta) * 1000, median(tb) * 1000, "ms", "<=", 1.5,
                 f"yoi pod start with {entries} log entries / with an empty log")


CASES = [
    ("startup", case_startup),
    ("one-shot send", case_one_shot_send),
    ("streamed send", case_streamed_send),
    ("peer register", case_peer_register),
    ("list with hung Pods", case_list_hung),
    ("doctor at scale", case_doctor_scale),
    ("log size", case_log_size),
    ("idle connections", case_idle_connections),
    ("history RSS", case_history_rss),
    ("start with history", case_start_with_history),
]


def fmt(x):
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    ap.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    ap.add_argument("--case", action="append", metavar="NAME",
                    help="run only this case (repeatable)")
    args = ap.parse_args(argv)
    rows = []
    header = f"{'case':<22} {'figure':>10} {'baseline':>10} {'unit':>6} {'ratio':>7} {'target':>8}  result"
    print(header)
    print("-" * len(header))
    for name, fn in CASES:
        if args.case and name not in args.case:
            continue
        try:
            row = fn(args.quick)
        except Exception as e:  # a case that cannot run is reported, not hidden
            row = Row(name, None, None, "", None, "", "ERROR", f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        print(f"{row.case:<22} {fmt(row.figure):>10} {fmt(row.baseline):>10} {row.unit:>6} "
              f"{fmt(row.ratio):>7} {row.target:>8}  {row.status}  {row.note}", flush=True)
    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "cores": os.cpu_count(),
            "machine": platform.machine(), "quick": args.quick,
            "rows": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    bad = [r for r in rows if r.status != "PASS"]
    print(f"\n{len(rows) - len(bad)} passed, {len(bad)} missed or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
