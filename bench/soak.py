"""``python -m bench.soak``: long reliability soaks; exit 1 on any violation.

* crash: random peer registrations and removals among 20 Pods, ``kill -9`` at
  random moments, recovery after each kill; counts one-sided relations, files
  that do not parse, completed operations missing, leftover journals/temp files.
* delivery: messages from 4 senders (two acknowledged by the broadcast, two
  by compact acks) retried with the same ``--id`` while the receiving Pod is
  killed and restarted at random; counts acknowledged messages missing from
  the log, and messages present twice.
* children: a parent Pod and a child it spawned with a task, each SIGKILLed
  (or the child stopped) and restarted at random moments; counts notices in
  the parent's log twice, runs of the child told never or twice, and tasks
  done told other than once.
* hostile: clients sending random bytes, over-long lines, lines nested 100,000
  deep, integers of 5,000 digits, unpaired surrogates, NaN and 1e999, and idling at a Pod while a well-behaved
  sender measures its acknowledgement latency; counts Pod death, lost
  acknowledged messages, and RSS growth beyond a bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.common import env_for, rss_kib, state_dir, yoi

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


def log(msg: str) -> None:
    print(msg, flush=True)


# -- crash ---------------------------------------------------------------------

def soak_crash(iterations: int, seed: int) -> int:
    sys.path.insert(0, str(TESTS_DIR))
    from peer_worker import KillLoop, leftover_files, pairs_of, recover, relations
    from yoi import store
    from yoi.state import State
    violations = {"unparseable or one-sided": 0, "completed op missing": 0, "leftover files": 0}
    pods = [f"p{i:02d}" for i in range(20)]
    with state_dir("yoi-soak-crash-") as st:
        state = State.resolve(st)
        for name in pods:
            store.create(state, name)
        loop = KillLoop(st, pods, seed=seed)
        try:
            for i in range(1, iterations + 1):
                loop.round(max_delay=0.005, max_ops=3)
                recover(st)
                left = leftover_files(st)
                if left:
                    violations["leftover files"] += 1
                    log(f"  round {i}: leftover {left}")
                try:
                    pairs = pairs_of(relations(st))
                except Exception as e:  # AssertionError (one-sided) or CorruptMetadata
                    violations["unparseable or one-sided"] += 1
                    log(f"  round {i}: {e}")
                    continue
                bad = loop.mismatches(pairs)
                if bad:
                    violations["completed op missing"] += 1
                    log(f"  round {i}: {bad}")
                loop.settle(pairs)
                if i % 100 == 0:
                    log(f"  crash: {i}/{iterations} rounds, {loop.done} ops done, "
                        f"{loop.inflight_kills} kills inside an operation")
        finally:
            loop.close()
    log(f"crash: {loop.rounds} kill rounds, {loop.done} completed operations, "
        f"{loop.inflight_kills} kills landed inside an operation; violations: {violations}")
    return sum(violations.values())


# -- helpers for live Pods -----------------------------------------------------

def pod_pid(st: Path, name: str) -> int | None:
    from yoi.lock import is_locked, lock_holder_pid
    path = st / "pods" / name / "runtime.lock"
    return lock_holder_pid(path) if is_locked(path) else None


def socket_of(st: Path, name: str) -> str:
    from yoi.state import State
    from yoi.store import read
    state = State.resolve(st)
    return str(state.socket_path(name, read(state, name)))


def log_ids(st: Path, name: str) -> list[str]:
    ids = []
    with open(st / "pods" / name / "session.jsonl", "rb") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            item = entry.get("item") or {}
            if entry.get("kind") == "system_item" and item.get("id"):
                ids.append(item["id"])
    return ids


# -- delivery --------------------------------------------------------------------

def soak_delivery(messages: int, seed: int) -> int:
    from yoi import client, protocol
    from yoi.errors import YoiError
    rng = random.Random(seed)
    senders = [f"s{i}" for i in range(4)]
    with state_dir("yoi-soak-delivery-") as st:
        env = env_for(st)
        yoi("pod", "create", "r", env=env)
        for s in senders:
            yoi("pod", "create", s, env=env)
            yoi("pod", "peer", "register", s, "r", env=env)
        yoi("pod", "start", "r", env=env)
        acked: dict[str, set[str]] = {s: set() for s in senders}
        retries = [0]
        def send_all(sender: str, count: int):
            # half the senders ask for compact acknowledgements, half for the broadcast
            compact = int(sender[1:]) % 2 == 1
            for i in range(count):
                msg_id = f"{sender}-{i}"
                while True:
                    try:
                        text = f"message {i} from {sender}"
                        if compact:
                            client.deliver(socket_of(st, "r"), lambda supports: protocol
                                           .notify_method(text, msg_id, sender, supports),
                                           msg_id, timeout=5)
                        else:
                            client.notify(socket_of(st, "r"), text, msg_id, source=sender,
                                          timeout=5)
                        acked[sender].add(msg_id)
                        break
                    except YoiError:
                        retries[0] += 1
                        time.sleep(0.02)

        threads = [threading.Thread(target=send_all, args=(s, messages // len(senders)))
                   for s in senders]
        kills = 0
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(rng.uniform(0.05, 0.4))
                pid = pod_pid(st, "r")
                if pid and any(t.is_alive() for t in threads):
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                    yoi("pod", "start", "r", env=env, timeout=60)
                done = sum(len(a) for a in acked.values())
                log(f"  delivery: {done}/{messages} acknowledged, {kills} kills, "
                    f"{retries[0]} retries")
            for t in threads:
                t.join()
        finally:
            yoi("pod", "stop", "r", "--force", env=env, check=False)
        ids = log_ids(st, "r")
        counts: dict[str, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        all_acked = set().union(*acked.values())
        missing = [i for i in all_acked if i not in counts]
        twice = [i for i, c in counts.items() if c > 1]
    log(f"delivery: {len(all_acked)} acknowledged, {kills} kills, {retries[0]} retries; "
        f"violations: missing={len(missing)} duplicated={len(twice)}")
    return len(missing) + len(twice)


# -- hostile ---------------------------------------------------------------------

# Lines that once ended a Pod (Python's parsers raise RecursionError, or a bare
# ValueError for an integer of more than 4,300 digits).
NESTED_LINES = [
    b"[" * 100_000 + b"\n",
    b'{"method":"notify","params":{"message":"x","deep":' + b"[" * 100_000 + b"]" * 100_000
    + b"}}\n",
    b'{"method":"notify","params":{"message":"x","n":' + b"9" * 5000 + b"}}\n",
    b'{"method":"run","params":{"input":' + b"[" * 500 + b"]" * 500 + b"}}\n",
    # and lines that once wedged an id or left a Pod "running", or wrote non-JSON
    b'{"method":"notify","params":{"message":"\\ud800","id":"soak-surrogate"}}\n',
    b'{"method":"run","params":{"input":"\\udc00"}}\n',
    b'{"method":"run","params":{"input":[{"content":"x","n":1e999}]}}\n',
    b'{"method":"notify","params":{"message":"x","n":NaN}}\n',
]


def soak_hostile(seconds: float, seed: int, clients: int = 50) -> int:
    from yoi import client
    from yoi.errors import YoiError
    rng = random.Random(seed)
    with state_dir("yoi-soak-hostile-") as st:
        env = env_for(st)
        yoi("pod", "create", "target", env=env)
        yoi("pod", "start", "target", env=env)
        pid = pod_pid(st, "target")
        path = socket_of(st, "target")
        time.sleep(0.3)
        rss0 = rss_kib(pid)
        stop = threading.Event()
        hostile_conns = [0]

        def hostile(k: int):
            r = random.Random(seed * 1000 + k)
            while not stop.is_set():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(2)
                    s.connect(path)
                    hostile_conns[0] += 1
                    kind = r.choice(["garbage", "long", "idle", "nested"])
                    if kind == "nested":
                        for _ in range(r.randint(1, 5)):
                            s.sendall(r.choice(NESTED_LINES))
                    elif kind == "garbage":
                        for _ in range(r.randint(1, 20)):
                            s.sendall(os.urandom(r.randint(1, 4096)) + r.choice([b"\n", b""]))
                    elif kind == "long":
                        chunk = b"x" * 65536
                        for _ in range(r.randint(20, 40)):  # 1.3-2.6 MiB with no newline
                            s.sendall(chunk)
                        s.sendall(b"\n")
                    else:
                        stop.wait(r.uniform(0.5, 3))
                except OSError:
                    pass
                finally:
                    s.close()

        latencies, acked, lost, errors = [], [], 0, 0
        threads = [threading.Thread(target=hostile, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        peak = rss0
        deadline = time.monotonic() + seconds
        i = 0
        try:
            while time.monotonic() < deadline:
                i += 1
                t0 = time.perf_counter()
                try:
                    client.notify(path, f"well-behaved {i}", f"good-{i}", timeout=10)
                    latencies.append(time.perf_counter() - t0)
                    acked.append(f"good-{i}")
                except YoiError as e:
                    errors += 1
                    log(f"  hostile: send {i} failed: {e.message}")
                peak = max(peak, rss_kib(pid))
                time.sleep(0.05 * rng.random())
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)
        alive = pod_pid(st, "target") == pid
        ids = set(log_ids(st, "target"))
        lost = sum(1 for a in acked if a not in ids)
        yoi("pod", "stop", "target", "--force", env=env, check=False)
    bound = max(3 * rss0, rss0 + 64 * 1024)
    rss_violation = peak > bound
    lat = sorted(latencies) or [0.0]
    log(f"hostile: {seconds:g}s, {clients} hostile clients ({hostile_conns[0]} connections), "
        f"{len(acked)} acknowledged sends, {errors} failed sends; latency median "
        f"{statistics.median(lat) * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99) - 1] * 1000:.1f} ms; "
        f"RSS {rss0} -> peak {peak} KiB (bound {bound}); "
        f"violations: pod_died={not alive} lost={lost} rss={rss_violation}")
    return int(not alive) + lost + int(rss_violation)


# -- children ------------------------------------------------------------------

def soak_children(rounds: int, seed: int) -> int:
    from yoi import control
    from yoi.state import State
    rng = random.Random(seed)
    with state_dir("yoi-soak-children-") as st:
        env, state = env_for(st), State.resolve(st)

        def entries(name):
            out = []
            for line in (st / "pods" / name / "session.jsonl").read_bytes().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
            return out

        yoi("pod", "create", "lead", env=env)
        yoi("pod", "start", "lead", env=env)
        yoi("pod", "spawn", "lead", "kid", "--exec", "cat", "--task", "work", env=env)
        kills = 0
        try:
            for _ in range(rounds):
                time.sleep(rng.uniform(0, 0.3))
                victim = rng.choice(["lead", "kid", "kid-clean"])
                if victim == "kid-clean":
                    yoi("pod", "stop", "kid", env=env, check=False)
                else:
                    pid = control.holder_pid(state.runtime_lock_path(victim))
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                time.sleep(rng.uniform(0, 0.2))
                for name in ("lead", "kid"):
                    if not control.is_running(state, name):
                        yoi("pod", "start", name, env=env, check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # quiet: every ended run told
                runs = [e for e in entries("kid") if e["kind"] == "pod_started"]
                told = [e for e in entries("lead") if e["kind"] == "child_stopped"]
                if len(told) >= len(runs) - 1:
                    break
                time.sleep(0.2)
        finally:
            yoi("pod", "stop", "lead", "--recursive", "--force", env=env, check=False)
        runs = [e["seq"] for e in entries("kid") if e["kind"] == "pod_started"]
        notices = [e for e in entries("lead") if e["kind"].startswith("child_")]
        ids = [e["id"] for e in notices]
        twice = len(ids) - len(set(ids))
        told = sorted(e["run"] for e in notices if e["kind"] == "child_stopped")
        runs_wrong = len(set(runs) ^ set(told)) + (len(told) - len(set(told)))
        done = sum(1 for e in notices if e["kind"] == "child_completed")
        done_wrong = int(done != 1)
    log(f"children: {rounds} rounds, {kills} SIGKILLs, {len(runs)} runs of the child, "
        f"{len(notices)} notices; violations: twice={twice} runs_wrong={runs_wrong} "
        f"done_wrong={done_wrong}")
    return twice + runs_wrong + done_wrong


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["crash", "delivery", "children", "hostile"],
                    action="append")
    ap.add_argument("--iterations", type=int, default=2000, help="crash soak rounds")
    ap.add_argument("--messages", type=int, default=10000, help="delivery soak messages")
    ap.add_argument("--seconds", type=float, default=60, help="hostile soak duration")
    ap.add_argument("--rounds", type=int, default=200, help="children soak rounds")
    ap.add_argument("--seed", type=int, default=20261127)
    args = ap.parse_args(argv)
    which = args.only or ["crash", "delivery", "children", "hostile"]
    total = 0
    for name in which:
        t0 = time.monotonic()
        if name == "crash":
            v = soak_crash(args.iterations, args.seed)
        elif name == "delivery":
            v = soak_delivery(args.messages, args.seed)
        elif name == "children":
            v = soak_children(args.rounds, args.seed)
        else:
            v = soak_hostile(args.seconds, args.seed)
        log(f"{name}: {v} violations in {time.monotonic() - t0:.0f}s\n")
        total += v
    log(f"soak: {total} violations")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
