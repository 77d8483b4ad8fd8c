"""Peer register/remove under injected crashes and I/O errors, and real write failures.

Every case checks the same property: after the failing command and the next
recovery, both Pods show exactly the old relation or exactly the new one,
nothing else in either file changed, and no journal or temp file is left.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import pytest

from peer_worker import leftover_files

# How the state is recovered after a crash. Every entry must leave the state
# fully recovered; the tests run once per entry.
RECOVERY_COMMANDS = {
    # the next ordinary command that takes the lock of one of the two Pods
    "next-command": ("pod", "peer", "list", "{source}"),
    # the repair command CI runs
    "doctor-fix": ("doctor", "--fix"),
}


def recover_with(cli, how: str, source: str, target: str):
    """Run recovery command HOW (a key of RECOVERY_COMMANDS) in-process; assert it worked."""
    args = [a.format(source=source, target=target) for a in RECOVERY_COMMANDS[how]]
    r = cli(*args)
    assert r.exit_code == 0, r
    return r


@dataclass(frozen=True)
class Scenario:
    """One peer operation from a fixed starting state.

    Pods: alpha (with an unknown key and a pre-existing peer gamma), beta
    (with a peer delta), gamma, delta. ``start`` sets up alpha/beta.
    """

    name: str
    op: str  # "register" or "remove"
    source: str
    target: str
    start: str  # "none", "mutual", or "one-sided" (source lists target only)

    @property
    def writes(self) -> int:
        return 1 if self.start == "one-sided" else 2


SCENARIOS = [
    Scenario("register", "register", "alpha", "beta", "none"),
    Scenario("remove", "remove", "beta", "alpha", "mutual"),
    Scenario("register-one-sided", "register", "alpha", "beta", "one-sided"),
]
ALL_PODS = ("alpha", "beta", "gamma", "delta")


def build(state, sc: Scenario) -> dict[str, bytes]:
    """Create the Pods for SC; return every metadata file's bytes."""
    from yoi import peers, store
    for name in ALL_PODS:
        store.create(state, name)
    peers.register(state, "alpha", "gamma")
    peers.register(state, "beta", "delta")
    store.update(state, "alpha", lambda d: {**d, "custom": {"note": "keep me", "n": [1, 2]}})
    if sc.start == "mutual":
        peers.register(state, sc.source, sc.target)
    elif sc.start == "one-sided":
        store.update(state, sc.source, lambda d: {**d, "peers": d["peers"] + [
            {"pod_name": sc.target, "registered_at": d["created_at"]}]})
    return read_all(state)


def read_all(state) -> dict[str, bytes]:
    return {n: state.metadata_path(n).read_bytes() for n in ALL_PODS}


def _expected_new(old: bytes, now: bytes, op: str, other: str) -> bytes | None:
    """OLD with exactly the operation's change applied (the entry as written in NOW)."""
    from yoi import metadata
    doc = tomllib.loads(old.decode())
    if op == "register":
        entries = [p for p in tomllib.loads(now.decode()).get("peers", [])
                   if p.get("pod_name") == other]
        if len(entries) != 1:
            return None
        if not metadata.has_peer(doc, other):
            doc.setdefault("peers", []).append(entries[0])
    else:
        doc["peers"] = [p for p in doc.get("peers", []) if p.get("pod_name") != other]
    return metadata.dumps(doc)


def outcome(state, sc: Scenario, old: dict[str, bytes]) -> str:
    """'old' or 'new' for the pair (identical on both sides); fails on anything else."""
    now = read_all(state)
    for name in ALL_PODS:
        if name not in (sc.source, sc.target):
            assert now[name] == old[name], f"{name} changed:\n{now[name].decode()}"
    seen = []
    for me, other in ((sc.source, sc.target), (sc.target, sc.source)):
        new = _expected_new(old[me], now[me], sc.op, other)
        states = {s for s, raw in (("old", old[me]), ("new", new)) if raw == now[me]}
        assert states, (f"{me} is neither the old nor the new record:\n{now[me].decode()}"
                        f"\n--- old ---\n{old[me].decode()}")
        seen.append(states)
    both = seen[0] & seen[1]
    assert len(both) == 1, f"one-sided result: {sc.source}={seen[0]} {sc.target}={seen[1]}"
    return both.pop()


def run_cmd(state, args, fault: str | None = None, preexec_fn=None):
    """Run the real `yoi` in a subprocess with YOI_FAULT set (or not)."""
    from conftest import Result
    env = dict(os.environ)
    env.pop("YOI_FAULT", None)
    if fault:
        env["YOI_FAULT"] = fault
    p = subprocess.run([sys.executable, "-m", "yoi", *args, "--state-dir", str(state.root)],
                       capture_output=True, text=True, env=env, timeout=60,
                       preexec_fn=preexec_fn)
    return Result(p.returncode, p.stdout, p.stderr, args)


def op_args(sc: Scenario) -> list[str]:
    return ["pod", "peer", "remove" if sc.op == "remove" else "register", sc.source, sc.target]


# -- every injection point x {crash, I/O error} --------------------------------------

# (YOI_FAULT point, needs a second write to be reached, before the commit point)
POINTS = [
    ("after-lock", False, True),
    ("atomic-before-replace:{action}:1", False, True),  # the journal being written
    ("after-journal", False, True),
    ("before-write-1", False, True),
    ("atomic-before-replace:{action}:2", False, True),  # first metadata replace
    ("after-write-1", False, True),
    ("before-write-2", True, True),
    ("atomic-before-replace:{action}:3", True, True),  # second metadata replace
    ("after-write-2", True, True),
    ("before-journal-remove", False, True),
    ("after-journal-remove", False, False),
]


def fault_spec(point: str, action: str) -> str:
    return point.format(action=action) if "{action}" in point else f"{point}:{action}"


@pytest.mark.parametrize("how", list(RECOVERY_COMMANDS))
@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point,second_write,before_commit", POINTS,
                         ids=[p[0].replace(":{action}", "") for p in POINTS])
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault_leaves_old_or_new_relation(cli, state, sc, point, second_write, before_commit,
                                          action, how):
    old = build(state, sc)
    r = run_cmd(state, op_args(sc), fault_spec(point, action))
    fired = not (second_write and sc.writes < 2)
    if not fired:
        expect_code, expect = 0, "new"
    elif action == "crash":
        expect_code, expect = 137, "old" if before_commit else "new"
    else:
        # An error after the commit point is not an error of the change.
        expect_code, expect = (1, "old") if before_commit else (0, "new")
    assert r.exit_code == expect_code, r
    if fired and action == "eio" and before_commit:
        assert "injected I/O error" in r.stderr, r
    if fired and action == "eio":
        assert leftover_files(state.root) == [], "the failing command cleaned up after itself"
    if fired and action == "crash" and point not in ("after-lock", "after-journal-remove"):
        assert leftover_files(state.root), "the crash should have left work for recovery"
    recover_with(cli, how, sc.source, sc.target)
    assert_recovered(state, sc, old, expect, how)
    assert leftover_files(state.root) == []


def assert_recovered(state, sc: Scenario, old: dict[str, bytes], expect: str, how: str) -> None:
    """The pair is wholly EXPECT ("old"/"new") after recovery HOW.

    One exception: when the old state was one-sided, `doctor --fix` goes on to
    remove that entry (a relation is real only when both sides hold it), and
    nothing else.
    """
    if not (how == "doctor-fix" and sc.start == "one-sided" and expect == "old"):
        assert outcome(state, sc, old) == expect
        return
    now = read_all(state)
    for name in ALL_PODS:
        if name != sc.source:
            assert now[name] == old[name], f"{name} changed:\n{now[name].decode()}"
    assert now[sc.source] == _expected_new(old[sc.source], now[sc.source], "remove", sc.target)


# -- faults during recovery, then a second recovery -----------------------------------

RECOVERY_POINTS = [
    "after-lock",
    "atomic-before-replace:{action}:1",  # restoring the first file
    "recovery-after-write-1",
    "atomic-before-replace:{action}:2",  # restoring the second file
    "recovery-after-write-2",
    "recovery-before-journal-remove",
]


@pytest.mark.parametrize("how", list(RECOVERY_COMMANDS))
@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point", RECOVERY_POINTS,
                         ids=[p.replace(":{action}", "") for p in RECOVERY_POINTS])
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_interrupted_recovery_is_finished_by_the_next(cli, state, sc, point, action, how):
    old = build(state, sc)
    # Crash with every file written and the journal still there.
    r = run_cmd(state, op_args(sc), "before-journal-remove:crash")
    assert r.exit_code == 137, r
    assert outcome(state, sc, old) == "new"  # on disk, before anything took a lock
    r = run_cmd(state, ["pod", "peer", "list", sc.target], fault_spec(point, action))
    fired = not (sc.writes < 2 and (point.endswith(":2") or point.endswith("write-2")))
    if fired:
        assert r.exit_code == (137 if action == "crash" else 1), r
        assert any(e.startswith("journal/") and e.endswith(".toml")
                   for e in leftover_files(state.root)), "the journal must survive"
    else:
        assert r.exit_code == 0, r
    recover_with(cli, how, sc.source, sc.target)
    assert_recovered(state, sc, old, "old", how)
    assert leftover_files(state.root) == []


@pytest.mark.parametrize("rule,code", [
    ("before-write-2:eio,recovery-after-write-1:crash", 137),
    ("atomic-before-replace:eio:3,recovery-after-write-1:eio", 1),
    ("after-write-2:eio,atomic-before-replace:crash:4", 137),
])
@pytest.mark.parametrize("sc", [s for s in SCENARIOS if s.writes == 2], ids=lambda s: s.name)
def test_failed_undo_after_an_error_is_finished_by_recovery(cli, state, sc, rule, code):
    old = build(state, sc)
    r = run_cmd(state, op_args(sc), rule)
    assert r.exit_code == code, r
    if code == 1:
        assert "journal" in r.stderr and "is kept" in r.stderr, r
    assert leftover_files(state.root), "the interrupted undo leaves its journal"
    recover_with(cli, next(iter(RECOVERY_COMMANDS)), sc.source, sc.target)
    assert outcome(state, sc, old) == "old"
    assert leftover_files(state.root) == []


# -- write failures caused from outside ------------------------------------------------

CAP_DAC_OVERRIDE = 1
PR_CAPBSET_DROP = 24


def _drop_dac_override():
    """preexec_fn: as root, lose CAP_DAC_OVERRIDE at exec so file modes apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_dac_override() -> bool:
    try:
        r = subprocess.run(["true"], preexec_fn=_drop_dac_override, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


class ReadOnlyTarget:
    """Make the target's Pod directory unwritable for the child, one way or another."""

    def __init__(self, kind, state, name):
        self.kind, self.path = kind, state.pod_dir(name)
        self.preexec_fn = None

    def __enter__(self):
        if self.kind == "chattr":
            if shutil.which("chattr") is None:
                pytest.skip("chattr is not installed")
            p = subprocess.run(["chattr", "+i", str(self.path)], capture_output=True, text=True)
            if p.returncode != 0:
                pytest.skip(f"chattr +i is not possible here: {p.stderr.strip()}")
        else:
            if os.geteuid() == 0:
                if not _can_drop_dac_override():
                    pytest.skip("running as root without CAP_SETPCAP: cannot drop "
                                "CAP_DAC_OVERRIDE, so a read-only directory is still writable")
                self.preexec_fn = _drop_dac_override
            os.chmod(self.path, 0o500)
        return self

    def __exit__(self, *exc):
        if self.kind == "chattr":
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        else:
            os.chmod(self.path, 0o700)


@pytest.mark.parametrize("kind", ["chattr", "chmod"])
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_target_write_failure_keeps_the_prior_relation(state, sc, kind):
    """A failure on the target side never loses the entry the source already had."""
    old = build(state, sc)
    with ReadOnlyTarget(kind, state, sc.target) as ro:
        r = run_cmd(state, op_args(sc), preexec_fn=ro.preexec_fn)
    assert r.exit_code == 1, r
    expected = os.strerror(errno.EPERM if kind == "chattr" else errno.EACCES)
    assert r.stderr.startswith(f"yoi: error: change failed and was rolled back: {expected}"), r
    assert read_all(state) == old
    if sc.start != "none":
        assert f'pod_name = "{sc.target}"' in old[sc.source].decode()  # still listed
    assert leftover_files(state.root) == []


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_file_size_limit_fails_before_any_pod_changes(state, sc):
    """RLIMIT_FSIZE: portable, but it hits the journal (always the largest file) first.

    Python ignores SIGXFSZ, so the oversized write fails with EFBIG.
    """
    old = build(state, sc)
    limit = max(len(raw) for raw in old.values()) + 200  # every Pod file fits
    r = run_cmd(state, op_args(sc), preexec_fn=_limit_file_size(limit))
    assert r.exit_code == 1, r
    assert "cannot write journal" in r.stderr and os.strerror(errno.EFBIG) in r.stderr, r
    assert r.stderr.rstrip().endswith("nothing changed"), r
    assert read_all(state) == old
    assert leftover_files(state.root) == []
