"""Peer-operation worker and kill loop, for the crash and concurrency tests and for bench/.

Run as a script (``python tests/peer_worker.py MODE ...``); it needs only the
``yoi`` package, not pytest. Every operation it performs is reported on stdout
as one line written with a single ``os.write`` (atomic on a pipe), so a reader
knows exactly which operations had reported success when the process died::

    begin register a b
    done register a b changed      (or: unchanged)
    fail register a b busy: Pod 'a' is locked by pid 42 (waited 10s)

Modes:

``run --state-dir D (--pods a,b,c | --pairs a:b,c:d) --count N --seed S [--mix M] [--wait]``
    perform N random operations, then exit 0. ``--mix register`` only
    registers, ``--mix both`` (default) registers or removes at random,
    ``--mix consent`` (for Pods on ``accept_peers = "ask"``) registers (a
    request), approves, denies or removes, the first Pod of a pair always
    being the one that asks (``approve a b``: b approves a's request); an
    approval or denial with no request pending is reported as ``skip``.
    ``--wait`` reads one line from stdin first, so that a test can start many
    workers and release them together.

``serve --state-dir D --pods a,b,c``
    a fork server for kill loops: for each stdin line ``run SEED`` it forks a
    child that performs random operations on pairs of PODS until it is killed,
    prints ``pid CHILD``, reaps the child and prints ``exit STATUS``. Everything
    the child printed comes before ``exit``. Forking from a process that has
    already imported yoi makes a round cost a few milliseconds.

From Python, ``KillLoop`` drives a ``serve`` worker (SIGKILL at random moments)
and tracks which state each pair may be in; ``relations`` and
``leftover_files`` check a state directory.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# -- checking a state directory -------------------------------------------------

def relations(state_dir: Path) -> dict[str, list[str]]:
    """Every Pod's peer names; raises if a metadata file does not parse."""
    from yoi import metadata
    from yoi.state import State
    from yoi.txn import read_pod_file
    state = State.resolve(state_dir)
    out = {}
    for name in state.pod_names():
        pod = read_pod_file(state, name)  # raises CorruptMetadata naming the file
        out[name] = metadata.peer_names(pod.doc)
    return out


def pairs_of(rel: dict[str, list[str]]) -> set[frozenset]:
    """The relation set; raises AssertionError on a one-sided or duplicated entry."""
    problems = []
    pairs = set()
    for name, peers in rel.items():
        if len(set(peers)) != len(peers):
            problems.append(f"{name} lists a peer twice: {peers}")
        for other in peers:
            if name not in rel.get(other, []):
                problems.append(f"{name} lists {other} but {other} does not list {name}")
            pairs.add(frozenset((name, other)))
    assert not problems, "; ".join(problems)
    return pairs


def requests_of(state_dir: Path) -> dict[str, list[str]]:
    """Every Pod's pending (unexpired) requests: asked Pod -> the Pods that asked it."""
    from yoi import metadata
    from yoi.state import State
    from yoi.txn import read_pod_file
    state = State.resolve(state_dir)
    return {name: [r["pod_name"] for r in metadata.pending_requests(
        read_pod_file(state, name).doc)] for name in state.pod_names()}


def disagreements(pairs: set[frozenset], requests: dict[str, list[str]]) -> list[str]:
    """Requests that contradict the relations: pending between peers, or asked twice."""
    out = []
    for asked, askers in requests.items():
        if len(set(askers)) != len(askers):
            out.append(f"{asked} holds two requests from one Pod: {askers}")
        out += [f"{asker} -> {asked}: a request is pending, but they are peers"
                for asker in askers if frozenset((asker, asked)) in pairs]
    return out


def leftover_files(state_dir: Path) -> list[str]:
    """Journals, temp files and removed-Pod directories left anywhere in STATE."""
    out = []
    journal_dir = Path(state_dir) / "journal"
    if journal_dir.is_dir():
        out += [f"journal/{e}" for e in os.listdir(journal_dir)]
    for root, dirs, files in os.walk(state_dir):
        for entry in dirs + files:
            if ".tmp-" in entry or ".removed-" in entry or ".creating-" in entry:
                out.append(os.path.relpath(os.path.join(root, entry), state_dir))
    return sorted(set(out))


def recover(state_dir: Path) -> None:
    """Take every Pod's lock once: this rolls back every leftover journal."""
    from yoi.state import State
    from yoi.txn import lock_pods
    state = State.resolve(state_dir)
    with lock_pods(state, state.pod_names()):
        pass


# -- the worker -----------------------------------------------------------------

def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def perform(state, op: str, a: str, b: str) -> bool | None:
    """Run one operation and report it; returns changed, or None on failure."""
    from yoi import peers
    from yoi.errors import NotFound, YoiError
    _say(f"begin {op} {a} {b}")
    try:
        if op == "approve":
            result = peers.approve(state, b, a)
        elif op == "deny":
            result = peers.deny(state, b, a)
        else:
            result = (peers.register if op == "register" else peers.unregister)(state, a, b)
    except NotFound as e:
        if op in ("approve", "deny") and "no pending peer request" in e.message:
            _say(f"skip {op} {a} {b}")
            return False
        _say(f"fail {op} {a} {b} {e.code}: {e.message}")
        return None
    except YoiError as e:
        _say(f"fail {op} {a} {b} {e.code}: {e.message}")
        return None
    _say(f"done {op} {a} {b} {'changed' if result['changed'] else 'unchanged'}")
    return result["changed"]


CONSENT_OPS = ["register"] * 4 + ["approve"] * 3 + ["deny"] + ["remove"] * 2


def random_op(rng: random.Random, pairs: list[tuple[str, str]], mix: str) -> tuple[str, str, str]:
    a, b = rng.choice(pairs)
    if mix == "consent":
        return rng.choice(CONSENT_OPS), a, b
    if rng.random() < 0.5:
        a, b = b, a  # either side may start the operation
    op = "register" if mix == "register" or rng.random() < 0.5 else "remove"
    return op, a, b


def _pairs_from(args) -> list[tuple[str, str]]:
    if args.pairs:
        return [tuple(p.split(":")) for p in args.pairs.split(",")]
    return list(itertools.combinations(args.pods.split(","), 2))


def _run(args) -> int:
    from yoi.state import State
    state = State.resolve(args.state_dir)
    pairs = _pairs_from(args)
    rng = random.Random(args.seed)
    if args.wait:
        sys.stdin.readline()
    for _ in range(args.count):
        perform(state, *random_op(rng, pairs, args.mix))
    return 0


def _serve(args) -> int:
    from yoi import peers  # noqa: F401  (imported once, before forking)
    from yoi.state import State
    state = State.resolve(args.state_dir)
    pairs = _pairs_from(args)
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["run"]:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                rng = random.Random(int(words[1]))
                while True:
                    perform(state, *random_op(rng, pairs, args.mix))
            finally:
                os._exit(70)
        _say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        _say(f"exit {status}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["run", "serve"])
    parser.add_argument("--state-dir", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--pods", help="comma-separated Pod names (all pairs are used)")
    group.add_argument("--pairs", help="comma-separated a:b pairs")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=["register", "both", "consent"], default="both")
    parser.add_argument("--wait", action="store_true")
    args = parser.parse_args(argv)
    return _run(args) if args.mode == "run" else _serve(args)


def worker_command(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / "peer_worker.py"), mode, *args]


def parse_report(text: str) -> list[tuple[str, str, str, str]]:
    """(kind, op, a, b) for each begin/done/fail line of a worker's stdout."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("begin", "done", "fail"):
            out.append((words[0], words[1], words[2], words[3]))
    return out


# -- the kill loop ----------------------------------------------------------------

class KillLoop:
    """SIGKILL a ``serve`` worker's children at random moments; track allowed states.

    ``allowed[pair]`` is the set of states (True: peers) the pair may be in:
    the result of its last reported operation, plus the result of an
    operation that was in flight when the worker died (it may or may not have
    committed). ``settle()`` narrows each pair to what was observed after a
    recovery.
    """

    # What a completed operation leaves the pair as (True: peers; None: as it was).
    EFFECTS = {"both": {"register": True, "remove": False},
               "consent": {"register": None, "approve": True, "deny": None, "remove": False}}

    def __init__(self, state_dir: Path, pods: list[str], seed: int = 0, mix: str = "both"):
        self.state_dir = Path(state_dir)
        self.pods = pods
        self.rng = random.Random(seed)
        self.effects = self.EFFECTS[mix]
        self.allowed = {frozenset(p): {False} for p in itertools.combinations(pods, 2)}
        self.rounds = self.done = self.inflight_kills = 0
        self.proc = subprocess.Popen(
            worker_command("serve", "--state-dir", str(state_dir), "--pods", ",".join(pods),
                           "--mix", mix),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def round(self, max_delay: float, max_ops: int = 2) -> None:
        """Start a child; once it has reported a random 0..MAX_OPS operations done,
        let it work for a random time up to MAX_DELAY s more, then kill -9 it.

        Waiting for reports first makes the number of completed operations
        independent of the machine's speed; the delay makes the kill land
        anywhere inside an operation (or inside the recovery that starts one).
        """
        self.proc.stdin.write(f"run {self.rng.getrandbits(32)}\n")
        self.proc.stdin.flush()
        inflight = None
        pid = None
        ops_before_kill = self.rng.randint(0, max_ops)
        done_here = 0
        killed = False
        while True:
            if not killed and pid is not None and done_here >= ops_before_kill:
                time.sleep(self.rng.uniform(0, max_delay))
                os.kill(pid, signal.SIGKILL)  # the server reaps it only after this
                killed = True
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited with {self.proc.wait()}")
            words = line.split()
            if words[0] == "pid":
                pid = int(words[1])
            elif words[0] == "exit":
                status = int(words[1])
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    raise RuntimeError(f"worker child ended with status {status}, not SIGKILL")
                break
            elif words[0] == "begin":
                inflight = (words[1], frozenset(words[2:4]))
            elif words[0] in ("done", "skip"):
                op, pair = words[1], frozenset(words[2:4])
                effect = self.effects[op] if words[0] == "done" else None
                if effect is not None:
                    self.allowed[pair] = {effect}
                self.done += 1
                done_here += 1
                inflight = None
            elif words[0] == "fail":
                raise RuntimeError(f"operation failed in the kill loop: {line.strip()}")
        if inflight is not None:
            op, pair = inflight
            if self.effects[op] is not None:
                self.allowed[pair] = self.allowed[pair] | {self.effects[op]}
            self.inflight_kills += 1
        self.rounds += 1

    def mismatches(self, pairs: set[frozenset]) -> list[str]:
        out = []
        for pair, allowed in sorted(self.allowed.items(), key=lambda kv: sorted(kv[0])):
            actual = pair in pairs
            if actual not in allowed:
                out.append(f"{'/'.join(sorted(pair))}: peers={actual}, expected one of {allowed}")
        return out

    def settle(self, pairs: set[frozenset]) -> None:
        for pair in self.allowed:
            self.allowed[pair] = {pair in pairs}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
