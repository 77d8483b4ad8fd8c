"""Check the state directory, and repair what can be repaired safely.

``run(state, fix=..., codes=..., progress=...)`` returns a ``Report``: every
finding has a stable code (``CHECKS``), the Pod it concerns, the path, a
message, whether ``--fix`` can repair it and whether it did.

The scan reads without locks, so what it sees can be a transaction of another
process caught between its two writes. Nothing that can be transient is
reported from the scan alone: a relation problem is re-checked under the
metadata locks of the Pods involved, a journal is leftover only when none of
its Pods' locks is held, a temp file is stale only when its owner's lock is
free. Every repair runs under the same locks as normal commands
(``yoi.txn.lock_pods``), so a doctor running beside other commands or a live
Pod cannot corrupt anything. A metadata file that does not parse is never
rewritten or deleted, and while a state directory is a symlink or not a
directory nothing at all is repaired (a repair would write through it).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from yoi import history, metadata, offline, session
from yoi.atomic import is_temp_name, read_bytes_nofollow
from yoi.discovery import probe, probe_many
from yoi.errors import CorruptMetadata, UsageError, YoiError
from yoi.lock import if_free, is_locked, lock_holder_pid
from yoi.names import is_valid_name
from yoi.parsing import paused_gc
from yoi.pool import POOL_CHUNK, POOL_THRESHOLD, map_chunks
from yoi.state import State
from yoi.txn import (REMOVED_MARK, Journal, hold_locks, leftover_dir_owner, list_journals,
                     load_journal, lock_pods, pid_alive, read_pod_file, rolled_back_bytes)

# The one table of check codes (stable identifiers), with a one-line description
# and whether ``--fix`` can repair such a finding.
CHECKS: dict[str, tuple[str, bool]] = {
    "state-permissions": ("a state directory (the root, pods/, locks/, journal/, run/, a Pod's "
                          "directory) is not mode 0700", True),
    "state-owner": ("a state directory is not owned by the current user", False),
    "state-not-dir": ("the state directory, pods/, locks/, journal/ or run/ is not a directory "
                      "(nothing is repaired until it is)", False),
    "pod-dir-name": ("an entry under pods/ whose name is not a valid Pod name", False),
    "pod-not-dir": ("an entry under pods/ with a Pod name that is not a directory", False),
    "symlink": ("a symlink where a file or directory is expected (never followed)", False),
    "unreadable": ("a state file or directory that cannot be read", False),
    "metadata-missing": ("a Pod directory without metadata.toml", False),
    "metadata-parse": ("metadata.toml does not parse (never rewritten: fix it by hand)", False),
    "metadata-schema": ("metadata.toml parses but fails the schema", False),
    "metadata-name": ("metadata.toml's pod_name differs from its directory name", False),
    "peer-one-sided": ("a Pod lists a peer that does not list it back (the entry is removed)",
                       True),
    "peer-dangling": ("a Pod lists a peer that does not exist (the entry is removed)", True),
    "peer-self": ("a Pod lists itself as a peer (the entry is removed)", True),
    "peer-duplicate": ("a Pod lists the same peer more than once (entries are merged)", True),
    "peer-request-expired": ("a peer request is past its expiry: every command already treats it "
                             "as absent (it is removed)", True),
    "peer-request-dangling": ("a peer request, or a recorded denial, names a Pod that does not "
                              "exist, or was made by an earlier Pod of that name (it is "
                              "removed)", True),
    "peer-request-stale": ("a peer request is pending although the two Pods are peers already "
                           "(it is removed)", True),
    "child-orphan": ("a Pod names a parent that does not exist (its parent was removed); "
                     "remove it or its tree by hand", False),
    "child-unlisted": ("a Pod names a parent that does not list it among its children",
                       False),
    "child-dangling": ("a Pod lists a child that does not exist (the entry is removed)", True),
    "child-one-sided": ("a Pod lists a child that names no parent (the entry is removed)",
                        True),
    "child-other-parent": ("a Pod lists a child that names another parent (the entry is "
                           "removed when that parent lists the child)", True),
    "child-cycle": ("Pods name each other as parents in a cycle", False),
    "journal-leftover": ("the journal of an interrupted multi-Pod change (it is rolled back)",
                         True),
    "journal-corrupt": ("a journal that does not parse (left in place: inspect it by hand)",
                        False),
    "temp-file": ("a leftover temp file of an interrupted atomic write (it is removed)", True),
    "staging-dir": ("a leftover directory of an interrupted Pod creation or removal "
                    "(it is removed)", True),
    "stale-socket": ("a socket file that no process serves (it is removed)", True),
    "stale-pid": ("a recorded pid that is not the live Pod (the hint is cleared)", True),
    "session-torn": ("the last line of a session log is torn (it is moved aside into "
                     "session.jsonl.torn-TIME)", True),
    "session-unreadable": ("a session log has whole lines that are not entries (not JSON, "
                           "nested too deep, or no entry); readers keep and skip them (remove "
                           "them by hand)",
                           False),
    "handler-failing": ("a Pod's handler failed its last 3 runs (fix its --exec or --cwd)",
                        False),
    "queue-torn": ("the last record of a queue is torn (a crash during an append; its sender "
                   "was never told it was queued): it is moved aside into "
                   "queue.jsonl.torn-TIME", True),
    "queue-unreadable": ("a queue has whole lines that are not message records: they are "
                         "moved aside into queue.jsonl.bad-TIME", True),
    "queue-delivered": ("a stopped Pod's queue holds messages already in its session log, "
                        "and handled if it has a handler (it stopped between that and "
                        "removing them from its queue): they are dropped, as its next "
                        "start would", True),
}

# Severities. A warning is a harmless leftover of a crash that `--fix`, or the
# next start or command on that Pod, clears by itself: `yoi doctor` reports it
# and still exits 0 (unless --strict), so it can gate a job after a crashed
# one. Every other check is an error (exit 1).
WARNINGS: frozenset[str] = frozenset({"stale-socket", "stale-pid", "temp-file", "staging-dir",
                                      "session-torn", "peer-request-expired",
                                      "peer-request-dangling", "peer-request-stale",
                                      "queue-torn", "queue-delivered"})
ERROR, WARNING = "error", "warning"


def severity(code: str) -> str:
    return WARNING if code in WARNINGS else ERROR


PROBE_TIMEOUT = 0.2
PEERS_PER_LOCK = 64  # how many peers of one Pod are re-checked under one set of locks
STATE_SUBDIRS = ("pods", "locks", "journal", "run")
GONE = "gone"  # what a repair returns when, under the locks, the problem is no longer there

Progress = Callable[[str, int, int], None]


@dataclass
class Problem:
    code: str
    pod: str | None
    path: str
    message: str
    fixable: bool
    fixed: bool = False

    @property
    def severity(self) -> str:
        return severity(self.code)

    def to_json(self) -> dict:
        return {"code": self.code, "severity": self.severity, "pod_name": self.pod,
                "path": self.path, "message": self.message, "fixable": self.fixable,
                "fixed": self.fixed}


@dataclass
class Report:
    checked: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    strict: bool = False  # warnings fail too
    state_exists: bool = True

    @property
    def ok(self) -> bool:
        """True when no error (with STRICT: no problem at all) remains unfixed."""
        return not any(self.failing(p) for p in self.problems)

    def failing(self, p: Problem) -> bool:
        return not p.fixed and (self.strict or p.severity == ERROR)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    def count(self, level: str) -> int:
        """Problems of severity LEVEL that remain unfixed."""
        return sum(1 for p in self.remaining if p.severity == level)

    def to_json(self) -> dict:
        return {"ok": self.ok, "strict": self.strict, "state_exists": self.state_exists,
                "checked": dict(self.checked),
                "errors": self.count(ERROR), "warnings": self.count(WARNING),
                "problems": [p.to_json() for p in self.problems]}


def check_codes(codes: Iterable[str]) -> set[str]:
    """Validate --check codes; UsageError (exit 2) naming the known ones."""
    wanted = set(codes)
    unknown = sorted(wanted - CHECKS.keys())
    if unknown:
        raise UsageError(f"unknown check code {unknown[0]!r}; known codes: "
                         + ", ".join(CHECKS))
    return wanted


def run(state: State, fix: bool = False, codes: Iterable[str] | None = None,
        progress: Progress | None = None, strict: bool = False) -> Report:
    """Check STATE (and with FIX repair it); only the checks in CODES if given.
    With STRICT, warnings make the report fail too."""
    wanted = check_codes(codes) if codes else set(CHECKS)
    with paused_gc():  # what the scan keeps of 100,000 Pods holds no cycles
        report = _Doctor(state, fix, wanted, progress).run()
    report.strict = strict
    report.state_exists = _lstat(state.root) is not None
    return report


# -- small file helpers -------------------------------------------------------

def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None



def _describe(e: BaseException) -> str:
    if isinstance(e, YoiError):
        return e.message
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e) or type(e).__name__


def _socket_refused(path: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if PATH is a socket file and nothing accepts connections on it."""
    st = _lstat(path)
    return st is not None and stat.S_ISSOCK(st.st_mode) and not probe(path, timeout)["reachable"]


# -- metadata as a leftover journal would leave it ------------------------------

def _parse_status(raw: bytes | None, name: str) -> tuple[str, dict | None]:
    if raw is None:
        return "missing", None
    try:
        return "ok", metadata.parse(raw, name, expect_name=name)
    except CorruptMetadata:
        return "corrupt", None


class _CheckView:
    """Read-only view under plain metadata locks: leftover journals are applied in memory.

    Holding a Pod's lock proves that a journal naming it is leftover (its writer
    held every lock it names until it deleted the journal).
    """

    def __init__(self, state: State, journals: list[Journal]):
        self.state = state
        self.journals = journals

    def read(self, name: str) -> tuple[str, dict | None]:
        for j in self.journals:
            applies, raw = rolled_back_bytes(self.state, j, name)
            if applies:
                return _parse_status(raw, name)
        try:
            raw = read_bytes_nofollow(self.state.metadata_path(name))
        except FileNotFoundError:
            return ("corrupt" if self.state.pod_dir(name).is_dir() else "missing"), None
        except OSError:
            return "corrupt", None
        return _parse_status(raw, name)


class _FixView:
    def __init__(self, locked):
        self.locked = locked

    def read(self, name: str) -> tuple[str, dict | None]:
        try:
            pod = self.locked.read(name)
        except YoiError:
            return "corrupt", None
        return ("ok", pod.doc) if pod.exists else ("missing", None)


# -- the doctor ---------------------------------------------------------------

@dataclass
class _Pod:
    """What the scan keeps of one Pod (small: it may come back from a worker process)."""

    name: str
    status: str = "ok"  # ok | corrupt | gone (removed while we looked)
    peers: list[str] | None = None  # None unless the metadata is good
    pid: object = None  # [runtime] pid and socket_path hints, as recorded
    socket_path: object = None
    temps: list[str] = field(default_factory=list)
    torn: tuple[int, int, str] | None = None  # see session.torn_tail
    has_session: bool = False
    has_queue: bool = False  # a queue.jsonl that is not empty
    # (requester, expires, requested): the times as POSIX seconds
    requests: list[tuple[str, float, float]] = field(default_factory=list)
    created: float | None = None  # when its record was created
    denied: list[str] = field(default_factory=list)  # Pods whose requests were denied
    failing: str | None = None  # how its handler's last FAILING_RUNS runs, all failed, ended
    parent: str | None = None  # the parent its record names
    children: list[str] = field(default_factory=list)  # the children its record lists


Finding = tuple[str, str | None, str, str]  # code, pod, path, message


def scan_pod(pods_dir: str, name: str) -> tuple[_Pod, list[Finding]]:
    """Look at one Pod directory without locks: its metadata, temp files, session tail."""
    pod = _Pod(name)
    found: list[Finding] = []
    path = os.path.join(pods_dir, name)
    try:
        files = os.listdir(path)
    except FileNotFoundError:
        pod.status = "gone"
        return pod, found
    except OSError as e:
        pod.status = "corrupt"
        return pod, [("unreadable", name, path, f"cannot list: {_describe(e)}")]
    pod.temps = [f for f in files if is_temp_name(f)]
    if "runtime.lock" in files:
        _scan_runtime_lock(pod, os.path.join(path, "runtime.lock"), found)
    for index in ("session.index", "session.index-wal", "session.index-shm"):
        if index in files:
            _scan_index_file(pod, os.path.join(path, index), found)
    if "session.jsonl" in files:
        _scan_session(pod, os.path.join(path, "session.jsonl"), found)
    if "queue.jsonl" in files:
        _scan_queue(pod, os.path.join(path, "queue.jsonl"), found)
    meta = os.path.join(path, "metadata.toml")
    pod.status = "corrupt"
    if "metadata.toml" not in files:
        found.append(("metadata-missing", name, meta, "the Pod directory has no metadata.toml"))
    else:
        has_exec = _scan_metadata(pod, meta, found)
        if pod.failing is not None and has_exec:  # else no handler runs any more
            found.append(("handler-failing", name, os.path.join(path, "session.jsonl"),
                          f"its handler failed its last {FAILING_RUNS} runs, the last "
                          f"{pod.failing}; see `yoi pod log {name}` and fix it with "
                          f"`yoi pod config {name} --exec ...` (or its --cwd)"))
    return pod, found


def _scan_runtime_lock(pod: _Pod, lock: str, found: list[Finding]) -> None:
    st = _lstat(Path(lock))
    if st is not None and stat.S_ISLNK(st.st_mode):
        found.append(("symlink", pod.name, lock, "runtime.lock is a symlink; never followed"))
    elif st is not None and not stat.S_ISREG(st.st_mode):
        found.append(("unreadable", pod.name, lock, "runtime.lock is not a regular file, so "
                      "the Pod cannot start; remove it"))


def _scan_index_file(pod: _Pod, path: str, found: list[Finding]) -> None:
    """The id index is a cache the Pod rebuilds, but only over a regular file."""
    st = _lstat(Path(path))
    name = os.path.basename(path)
    if st is not None and stat.S_ISLNK(st.st_mode):
        found.append(("symlink", pod.name, path, f"{name} is a symlink; never followed, so "
                      "the Pod cannot start; remove it (the index is rebuilt from the log)"))
    elif st is not None and not stat.S_ISREG(st.st_mode):
        found.append(("unreadable", pod.name, path, f"{name} is not a regular file, so the "
                      "Pod cannot start; remove it (the index is rebuilt from the log)"))


def _scan_session(pod: _Pod, path: str, found: list[Finding]) -> None:
    try:
        pod.torn = session.torn_tail(path)
        pod.has_session = True
        bad, runs = _read_session(path)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            found.append(("symlink", pod.name, path, "session.jsonl is a symlink; never followed"))
        else:
            found.append(("unreadable", pod.name, path, f"cannot read: {_describe(e)}"))
        return
    if bad and pod.torn is not None and bad[-1][1] == pod.torn[1]:
        bad.pop()  # the last line: reported as session-torn
    if bad:
        where = ", ".join(str(n) for n, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        found.append(("session-unreadable", pod.name, path,
                      f"{len(bad)} line(s) are not entries (not JSON, nested too deep, or "
                      f"no entry): line "
                      f"{where}; the Pod and `yoi pod log` keep and skip them. "
                      "To drop them, stop the Pod and delete those lines by hand"))
    if len(runs) == FAILING_RUNS and all(history.failed(r) for r in runs):
        pod.failing = f"({runs[-1].get('at')}) with {history.failure_words(runs[-1])}"


def _scan_queue(pod: _Pod, path: str, found: list[Finding]) -> None:
    """Only whether there is a queue to look at: it is read under the Pod's lock."""
    st = _lstat(Path(path))
    if st is not None and stat.S_ISLNK(st.st_mode):
        found.append(("symlink", pod.name, path, "queue.jsonl is a symlink; never followed, "
                      "so the Pod cannot start; move it out of the way"))
    elif st is not None and not stat.S_ISREG(st.st_mode):
        found.append(("unreadable", pod.name, path, "queue.jsonl is not a regular file, so "
                      "the Pod cannot start; move it out of the way"))
    elif st is not None and st.st_size > 0:
        pod.has_queue = True


FAILING_RUNS = 3  # a handler whose last this many runs failed is reported


def _read_session(path: str) -> tuple[list[tuple[int, int]], list[dict]]:
    """One pass over a session log: (line number, offset just past it) of each whole
    line that is not JSON (or nested too deeply to be read), and its last
    ``FAILING_RUNS`` handler results. A last line without its newline is
    session-torn's business."""
    bad, runs = [], []
    fd = session.open_log(path)  # a FIFO in its place is refused, not waited on
    with open(fd, "rb") as f:
        end = 0
        for n, line in enumerate(f, 1):
            end += len(line)
            if line.endswith(b"\n") and line.strip():
                obj = session.parse_entry(line)  # the readers' rule: skipped if None
                if obj is None:
                    bad.append((n, end))
                    continue
                if (b'"handler_result"' in line and obj.get("kind") == "handler_result"
                        and obj.get("ended") != "stopped"):  # the stop's doing
                    runs = (runs + [obj])[-FAILING_RUNS:]
    return bad, runs


def _scan_metadata(pod: _Pod, meta: str, found: list[Finding]) -> bool:
    """Look at one metadata file; whether the Pod has a handler (an --exec)."""
    name = pod.name
    try:
        raw = read_bytes_nofollow(meta)
    except FileNotFoundError:
        pod.status = "gone"
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            found.append(("symlink", name, meta, "metadata.toml is a symlink; never followed"))
        else:
            found.append(("unreadable", name, meta, f"cannot read: {_describe(e)}"))
        return False
    try:
        doc = metadata.loads(raw, meta)
    except CorruptMetadata as e:
        found.append(("metadata-parse", name, meta, e.message.removeprefix(f"{meta}: ")
                      + "; never rewritten by Yoi: repair or remove it by hand"))
        return False
    problem = metadata.schema_problem(doc)
    if problem:
        found.append(("metadata-schema", name, meta, problem))
    elif doc["pod_name"] != name:
        found.append(("metadata-name", name, meta, f"pod_name {doc['pod_name']!r} differs "
                      f"from its directory name {name!r}"))
    else:
        pod.status = "ok"
        pod.peers = metadata.peer_names(doc)
        pod.requests = [(r["pod_name"], r["expires_at"].timestamp(),
                         r["requested_at"].timestamp())
                        for r in doc.get("peer_requests", [])]
        pod.denied = [d["pod_name"] for d in doc.get("peer_denials", [])]
        pod.parent, pod.children = metadata.parent_of(doc), metadata.child_names(doc)
        runtime = doc.get("runtime") or {}
        pod.pid, pod.socket_path = runtime.get("pid"), runtime.get("socket_path")
        created = doc.get("created_at")
        pod.created = created.timestamp() if hasattr(created, "timestamp") else None
        return bool(runtime.get("exec"))
    return False


def _scan_chunk(pods_dir: str, names: list[str]) -> list[tuple[_Pod, list[Finding]]]:
    return [scan_pod(pods_dir, name) for name in names]


def _scan_all(pods_dir: str, names: list[str], progress: Progress):
    """scan_pod over NAMES, in worker processes when there are many (parsing is CPU)."""
    done = 0
    for result in map_chunks(functools.partial(_scan_chunk, pods_dir), names,
                             POOL_THRESHOLD, POOL_CHUNK):
        done += len(result)
        progress("pods", done, len(names))
        yield from result


class _Doctor:
    def __init__(self, state: State, fix: bool, wanted: set[str], progress: Progress | None):
        self.state = state
        self.fix = fix
        self.wanted = wanted
        self.progress = progress or (lambda phase, done, total: None)
        self.problems: list[Problem] = []
        self.checked = {"pods": 0, "relations": 0, "journals": 0, "sessions": 0, "sockets": 0}
        self.pods: dict[str, _Pod] = {}
        self.leftover: list[Journal] = []
        self._effective: dict[str, tuple] = {}  # see ``effective``
        self.bad_dirs: set[Path] = set()  # state directories that are symlinks or not directories
        self.blocked: str | None = None  # why no repair may run, if one may not

    @property
    def repairing(self) -> bool:
        return self.fix and self.blocked is None

    def add(self, code: str, pod: str | None, path, message: str,
            fixable: bool | None = None) -> Problem | None:
        if code not in self.wanted:
            return None
        p = Problem(code, pod, str(path), message,
                    CHECKS[code][1] if fixable is None else fixable)
        self.problems.append(p)
        return p

    def attempt(self, problem: Problem | None, action: Callable[[], str | None]) -> None:
        """Run a repair for PROBLEM; the action returns None when done, else why not."""
        self.attempt_all([problem] if problem is not None else [], action)

    def attempt_all(self, problems: list[Problem], action: Callable[[], str | None]) -> None:
        """One repair for several findings: they share its outcome.

        The action returns None when done, GONE when under the locks the
        problem turned out to be a passing state (the findings are dropped),
        else why it could not repair.
        """
        problems = [p for p in problems if p.fixable]
        if not problems or not self.fix:
            return
        if self.blocked:
            for p in problems:
                p.fixable = False
                p.message += f" (not repaired: {self.blocked})"
            return
        try:
            why_not = action()
        except (YoiError, OSError) as e:
            for p in problems:
                p.message += f" (fix failed: {_describe(e)})"
            return
        if why_not == GONE:
            self.problems = [p for p in self.problems if all(p is not q for q in problems)]
            return
        for p in problems:
            if why_not:
                p.fixable = False
                p.message += f" ({why_not})"
            else:
                p.fixed = True

    def run(self) -> Report:
        root = _lstat(self.state.root)
        if root is None:
            return Report(self.checked)  # a fresh install: nothing to check yet
        if not self.check_dirs():
            return Report(self.checked, self.problems)
        self.check_journals()
        self.scan_pods()
        # Temp files before relations: a relation repair takes the Pod's lock,
        # which removes its temp files without a word.
        self.check_temps()
        self.check_relations()
        self.check_requests()
        self.check_family()
        self.check_runtime()
        self.check_sessions()
        self.check_queues()
        self.problems.sort(key=lambda p: (p.pod or "", p.code, p.path))
        return Report(self.checked, self.problems)

    # -- directories ----------------------------------------------------------
    def check_dir(self, path: Path, pod: str | None = None,
                  st: os.stat_result | None = None, foreign: list[str] | None = None) -> None:
        st = st or _lstat(path)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            self.bad_dir(path, st)
            return
        if st.st_uid != os.getuid():
            self.add("state-owner", pod, path, f"owned by uid {st.st_uid}, not by the current "
                     f"user (uid {os.getuid()})")
            return
        mode = stat.S_IMODE(st.st_mode)
        if mode == 0o700:
            return
        message = f"mode {mode:04o}, expected 0700"
        if foreign:
            # Pointed at the wrong directory (a home, a CI workspace) by mistake?
            # Then making it private would hurt: leave that to a person.
            self.add("state-permissions", pod, path, f"{message}; not changed: it holds "
                     f"{foreign[0]!r}, which is not Yoi's (is it the right state directory?)",
                     fixable=False)
            return
        p = self.add("state-permissions", pod, path, message)
        self.attempt(p, lambda: os.chmod(path, 0o700))

    def bad_dir(self, path: Path, st: os.stat_result) -> None:
        """A state directory that is a symlink or not a directory: report it, block repairs."""
        self.bad_dirs.add(path)
        if stat.S_ISLNK(st.st_mode):
            self.add("symlink", None, path, "is a symlink; Yoi never follows symlinks in "
                     "its state directory")
            what = "a symlink"
        else:
            self.add("state-not-dir", None, path, "is not a directory")
            what = "not a directory"
        if self.blocked is None:
            self.blocked = f"{path} is {what}; repair that by hand first"

    def check_dirs(self) -> bool:
        """Check the state directories; False if the root itself is not a directory."""
        root = self.state.root
        try:
            st = os.stat(root)  # the root may be a symlink (~/.yoi -> /data/yoi)
        except OSError as e:
            self.add("unreadable", None, root, f"cannot stat: {_describe(e)}")
            return False
        if not stat.S_ISDIR(st.st_mode):
            self.bad_dir(root, st)
            return False
        try:
            foreign = sorted(set(os.listdir(root)) - set(STATE_SUBDIRS))
        except OSError:
            foreign = []
        # The layout first: a bad directory blocks every repair, the first
        # chmod included.
        subdirs = {path: _lstat(path) for path in
                   [root / sub for sub in STATE_SUBDIRS] + [self.state.short_run_dir()]}
        for path, sub_st in subdirs.items():
            if sub_st is not None and not stat.S_ISDIR(sub_st.st_mode):
                self.bad_dir(path, sub_st)
        self.check_dir(root, st=st, foreign=foreign)
        for path, sub_st in subdirs.items():
            if path not in self.bad_dirs:
                self.check_dir(path, st=sub_st)
        if self.state.locks_dir in self.bad_dirs:
            return True
        try:
            with os.scandir(self.state.locks_dir) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        self.add("symlink", entry.name[:-5] if entry.name.endswith(".lock")
                                 else None, entry.path, "lock file is a symlink; never followed")
        except (FileNotFoundError, NotADirectoryError):
            pass
        return True

    # -- journals -------------------------------------------------------------
    def check_journals(self) -> None:
        jdir = self.state.journal_dir
        if jdir in self.bad_dirs:
            return
        try:
            entries = sorted(os.listdir(jdir))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            path = jdir / entry
            if is_temp_name(entry):
                self.check_journal_temp(path, entry)
            elif entry.endswith(".toml") and not entry.startswith("."):
                self.checked["journals"] += 1
                self.check_journal(path)

    def check_journal_temp(self, path: Path, entry: str) -> None:
        # .TXID.toml.tmp-XXXX; TXID is MILLIS-PID-HEX and its writer is that pid.
        txid = entry[1:].split(".toml", 1)[0]
        parts = txid.split("-")
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if pid is None or pid == os.getpid() or pid_alive(pid):
            return
        p = self.add("temp-file", None, path, f"leftover temp file of a journal written by "
                     f"pid {pid}, which is gone")
        self.attempt(p, lambda: _unlink_quiet(path))

    def check_journal(self, path: Path) -> None:
        try:
            journal = load_journal(path)
        except FileNotFoundError:
            return
        except CorruptMetadata as e:
            self.add("journal-corrupt", None, path, e.message.removeprefix(f"{path}: ")
                     + "; left in place: inspect it by hand, then delete it")
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                self.add("symlink", None, path, "journal is a symlink; never followed")
            else:
                self.add("unreadable", None, path, f"cannot read journal: {_describe(e)}")
            return
        # Leftover only if no lock it names is held: its writer holds them all
        # until it has deleted the journal, so a journal still there after we
        # saw every lock free has no writer any more.
        if any(is_locked(self.state.lock_path(n)) for n in journal.pods):
            return
        if _lstat(path) is None:
            return
        names = ", ".join(journal.pods)
        p = self.add("journal-leftover", None, path,
                     f"interrupted change of Pods {names} (txid {journal.txid}); "
                     "rolling it back restores their prior metadata")
        self.attempt(p, lambda: self.roll_back(journal))
        if _lstat(path) is not None:
            self.leftover.append(journal)

    def roll_back(self, journal: Journal) -> str | None:
        with lock_pods(self.state, journal.pods):
            pass  # taking the locks rolls back every journal that names these Pods
        return "still there after rollback" if _lstat(journal.path) is not None else None

    # -- Pods -----------------------------------------------------------------
    def scan_pods(self) -> None:
        pods_dir = self.state.pods_dir
        if pods_dir in self.bad_dirs:
            return
        try:
            entries = list(os.scandir(pods_dir))
        except (FileNotFoundError, NotADirectoryError):
            return
        dirs = []
        for entry in entries:
            name = entry.name
            if not is_valid_name(name):
                self.check_odd_entry(entry)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                self.add("symlink", name, entry.path, "Pod directory is a symlink; never "
                         "followed")
                self.pods[name] = _Pod(name, "corrupt")
            elif not stat.S_ISDIR(st.st_mode):
                self.add("pod-not-dir", name, entry.path, "is not a directory")
                self.pods[name] = _Pod(name, "corrupt")
            else:
                self.check_dir(Path(entry.path), name, st)
                dirs.append(name)
        for pod, found in _scan_all(str(pods_dir), dirs, self.progress):
            for finding in found:
                self.add(*finding)
            if pod.status != "gone":
                self.checked["pods"] += 1
                self.pods[pod.name] = pod

    def check_odd_entry(self, entry: os.DirEntry) -> None:
        name, path = entry.name, Path(entry.path)
        owner = leftover_dir_owner(name)  # the same parsing as the code that made it
        if owner is not None:
            self.check_staging(path, *owner)
            return
        self.add("pod-dir-name", None, path, f"{name!r} is not a valid Pod name")

    def effective(self, name: str) -> tuple[str, list[str] | None, str | None, list[str]]:
        """NAME's status, peers, parent and children as the scan saw them, leftover
        journals rolled back (each rolled-back record parsed once)."""
        seen = self._effective.get(name)
        if seen is not None:
            return seen
        for j in self.leftover:
            applies, raw = rolled_back_bytes(self.state, j, name)
            if applies:
                status, doc = _parse_status(raw, name)
                seen = (status, metadata.peer_names(doc) if doc else None,
                        metadata.parent_of(doc), metadata.child_names(doc))
                break
        else:
            pod = self.pods.get(name)
            seen = (("missing", None, None, []) if pod is None
                    else (pod.status, pod.peers, pod.parent, pod.children))
        self._effective[name] = seen
        return seen

    def effective_peers(self, name: str) -> tuple[str, list[str] | None]:
        status, peers, _, _ = self.effective(name)
        return status, peers

    # -- relations ------------------------------------------------------------
    def check_relations(self) -> None:
        names = set(self.pods)
        for j in self.leftover:
            names.update(j.pods)
        lists: dict[str, list[str]] = {}  # the peer lists of the Pods that parse
        for name in names:
            status, peers = self.effective_peers(name)
            if status == "ok":
                lists[name] = peers
        sets = {name: set(peers) for name, peers in lists.items()}
        pairs = set()
        suspects: dict[str, set[str]] = {}
        for name, peers in lists.items():
            if len(peers) != len(sets[name]) or name in sets[name]:
                suspects.setdefault(name, set())  # self-peer or duplicates
            for other in peers:
                pairs.add((name, other) if name < other else (other, name))
                if other == name:
                    continue
                other_set = sets.get(other)
                if other_set is not None:
                    if name not in other_set:
                        suspects.setdefault(name, set()).add(other)
                elif self.effective_peers(other)[0] == "missing":
                    suspects.setdefault(name, set()).add(other)
        self.checked["relations"] = len(pairs)
        if not self.wanted & {"peer-one-sided", "peer-dangling", "peer-self", "peer-duplicate"}:
            return
        for i, (name, others) in enumerate(sorted(suspects.items()), 1):
            self.progress("relations", i, len(suspects))
            batches = sorted(others) or [None]
            for k in range(0, len(batches), PEERS_PER_LOCK):
                batch = [o for o in batches[k:k + PEERS_PER_LOCK] if o is not None]
                self.recheck_relations(name, batch, first=k == 0)

    @contextmanager
    def locked_view(self, names: list[str]):
        """Hold the metadata locks of NAMES: lock_pods when fixing, else plain locks."""
        if self.repairing:
            with lock_pods(self.state, names) as locked:
                yield _FixView(locked)
            return
        # Without a locks/ directory nobody holds a lock to wait for (and a
        # check creates no directory); through a symlink we take none.
        use_locks = (self.state.locks_dir not in self.bad_dirs
                     and _lstat(self.state.locks_dir) is not None)
        with hold_locks(self.state, names if use_locks else []):
            journals = [] if self.state.journal_dir in self.bad_dirs else [
                j for j in list_journals(self.state) if set(names) & set(j.pods)]
            yield _CheckView(self.state, journals)

    def recheck_relations(self, name: str, others: list[str], first: bool) -> None:
        """Re-read NAME and OTHERS under their locks; report (and fix) what persists."""
        with self.locked_view([name, *others]) as view:
            status, doc = view.read(name)
            if status != "ok":
                return
            meta = self.state.metadata_path(name)
            found: list[Problem | None] = []
            drop = set()  # peers whose entries go
            for other in others:
                if not metadata.has_peer(doc, other):
                    continue
                ostatus, odoc = view.read(other)
                if ostatus == "missing":
                    found.append(self.add("peer-dangling", name, meta, f"lists {other!r} as a "
                                          f"peer, but there is no Pod {other!r}"))
                elif ostatus == "ok" and not metadata.has_peer(odoc, name):
                    found.append(self.add("peer-one-sided", name, meta, f"lists {other!r} as "
                                          f"a peer, but {other!r} does not list {name!r}; a "
                                          "relation is real only when both sides hold it"))
                else:
                    continue
                if found[-1] is not None:
                    drop.add(other)
            merge = False
            if first:
                counts: dict[str, int] = {}
                for other in metadata.peer_names(doc):
                    counts[other] = counts.get(other, 0) + 1
                if counts.get(name):
                    found.append(self.add("peer-self", name, meta, "lists itself as a peer"))
                    if found[-1] is not None:
                        drop.add(name)
                for other, n in sorted(counts.items()):
                    if n > 1 and other not in drop:
                        found.append(self.add("peer-duplicate", name, meta,
                                              f"lists {other!r} as a peer {n} times"))
                        merge = merge or found[-1] is not None
            found = [p for p in found if p is not None]

            def repair():
                doc["peers"] = _repaired_peers(doc.get("peers", []), drop, merge)
                view.locked.write_one(name, doc)

            self.attempt_all(found, repair)

    # -- parents and children -------------------------------------------------
    def effective_family(self, name: str) -> tuple[str, str | None, list[str]]:
        status, _, parent, children = self.effective(name)
        return status, parent, children

    def check_family(self) -> None:
        codes = {"child-orphan", "child-unlisted", "child-dangling", "child-one-sided",
                 "child-other-parent", "child-cycle"}
        if not self.wanted & codes:
            return
        names = set(self.pods)
        for j in self.leftover:
            names.update(j.pods)
        family = {n: self.effective_family(n) for n in sorted(names)}
        pairs = set()  # (parent, child) pairs that look wrong from either side
        for name, (status, parent, kids) in family.items():
            if status != "ok":
                continue
            for kid in kids:
                kstatus, kparent, _ = family.get(kid, ("missing", None, []))
                if kstatus == "missing" or (kstatus == "ok" and kparent != name):
                    pairs.add((name, kid))
            if parent is not None:
                pstatus, _, pkids = family.get(parent, ("missing", None, []))
                if pstatus == "missing" or (pstatus == "ok" and name not in pkids):
                    pairs.add((parent, name))
        for parent, kid in sorted(pairs):
            self.recheck_family(parent, kid)
        for cycle in _cycles({n: f[1] for n, f in family.items() if f[0] == "ok"}):
            self.recheck_cycle(cycle)

    def recheck_family(self, parent: str, kid: str) -> None:
        """Re-read PARENT and KID (and the parent KID names) under their locks; report
        (and fix) what persists."""
        names = [parent, kid]
        named = self.effective_family(kid)[1]  # the parent KID names, as the scan saw it
        if named not in (None, parent):
            names.append(named)
        with self.locked_view(names) as view:
            pstatus, pdoc = view.read(parent)
            kstatus, kdoc = view.read(kid)
            if kstatus == "ok" and metadata.parent_of(kdoc) == parent and pstatus != "ok":
                if pstatus == "missing":
                    self.add("child-orphan", kid, self.state.metadata_path(kid),
                             f"names {parent!r} as its parent, but there is no Pod {parent!r}"
                             f"{self.removed_note(parent)}; remove it with `yoi pod rm {kid}` "
                             f"(`--recursive` with its children)")
                return
            if pstatus != "ok":
                return
            meta = self.state.metadata_path(parent)
            listed = metadata.has_child(pdoc, kid)
            if kstatus == "ok" and metadata.parent_of(kdoc) == parent:
                if not listed:
                    self.add("child-unlisted", kid, self.state.metadata_path(kid),
                             f"names {parent!r} as its parent, but {parent!r} does not list "
                             f"it among its children; a relation is real only when both "
                             "records hold it (repair by hand: the right fix is not known)")
                return
            if not listed or kstatus == "corrupt":
                return
            if kstatus == "missing":
                p = self.add("child-dangling", parent, meta, f"lists {kid!r} as a child, but "
                             f"there is no Pod {kid!r}")
            elif metadata.parent_of(kdoc) is None:
                p = self.add("child-one-sided", parent, meta, f"lists {kid!r} as a child, but "
                             f"{kid!r} names no parent")
            else:
                other = metadata.parent_of(kdoc)
                if other not in names:
                    return  # it changed since the scan: look again next time
                ostatus, odoc = view.read(other)
                theirs = ostatus == "ok" and metadata.has_child(odoc, kid)
                p = self.add("child-other-parent", parent, meta, f"lists {kid!r} as a child, "
                             f"but {kid!r} names {other!r} as its parent"
                             + (", which lists it" if theirs else
                                f"; {other!r} does not list it either (repair by hand)"),
                             fixable=theirs)

            def repair():
                metadata.drop_child(pdoc, kid)
                view.locked.write_one(parent, pdoc)

            self.attempt(p, repair)

    def removed_note(self, name: str) -> str:
        """Say so if a committed removal of NAME left its directory aside."""
        try:
            entries = os.listdir(self.state.pods_dir)
        except OSError:
            return ""
        if any((leftover_dir_owner(e) or (None, None))[:2] == (name, REMOVED_MARK)
               for e in entries):
            return " (it was removed)"
        return ""

    def recheck_cycle(self, cycle: list[str]) -> None:
        with self.locked_view(cycle) as view:
            parents = {}
            for name in cycle:
                status, doc = view.read(name)
                if status != "ok":
                    return
                parents[name] = metadata.parent_of(doc)
            if not _cycles(parents):
                return
            chain = " -> ".join(cycle + [cycle[0]])
            self.add("child-cycle", cycle[0], self.state.metadata_path(cycle[0]),
                     f"parents in a cycle: {chain} (each names the next as its parent); "
                     "repair by hand")

    # -- peer requests --------------------------------------------------------
    def check_requests(self) -> None:
        codes = {"peer-request-expired", "peer-request-dangling", "peer-request-stale"}
        if not self.wanted & codes:
            return
        now = time.time()
        for name, pod in sorted(self.pods.items()):
            if pod.status != "ok" or not (pod.requests or pod.denied):
                continue
            others = {n for n, _, _ in pod.requests} | set(pod.denied)
            suspects = {n for n, expires, _ in pod.requests if expires <= now}
            for other in others:
                status, peers = self.effective_peers(other)
                if status == "missing" or (other in (pod.peers or []) and name in (peers or [])):
                    suspects.add(other)
            for other, _, requested in pod.requests:  # made by an earlier Pod of the name
                created = self.pods[other].created if other in self.pods else None
                if created is not None and requested < created:
                    suspects.add(other)
            # One Pod's requests, re-checked in batches under the locks.
            suspects = sorted(suspects)
            for k in range(0, len(suspects), PEERS_PER_LOCK):
                self.recheck_requests(name, suspects[k:k + PEERS_PER_LOCK])

    def recheck_requests(self, name: str, others: list[str]) -> None:
        """Re-read NAME's requests from OTHERS under the locks; report and fix what persists."""
        with self.locked_view([name, *others]) as view:
            status, doc = view.read(name)
            if status != "ok":
                return
            meta = self.state.metadata_path(name)
            now = metadata.utcnow()
            found: list[Problem | None] = []
            drop_requests, drop_denials = set(), set()
            for r in doc.get("peer_requests", []):
                other = r["pod_name"]
                if other not in others:
                    continue
                ostatus, odoc = view.read(other)
                if ostatus == "missing":
                    found.append(self.add("peer-request-dangling", name, meta, f"has a peer "
                                          f"request from {other!r}, but there is no Pod "
                                          f"{other!r}"))
                elif ostatus == "ok" and metadata.predates(r, odoc):
                    found.append(self.add("peer-request-dangling", name, meta, f"has a peer "
                                          f"request from {other!r} (id {r['id']}) made before "
                                          f"this Pod {other!r} was created, by an earlier Pod "
                                          "of that name"))
                elif metadata.is_expired(r, now):
                    found.append(self.add("peer-request-expired", name, meta, f"has a peer "
                                          f"request from {other!r} (id {r['id']}) that expired "
                                          f"at {metadata.to_jsonable(r['expires_at'])}"))
                elif (ostatus == "ok" and metadata.has_peer(doc, other)
                      and metadata.has_peer(odoc, name)):
                    found.append(self.add("peer-request-stale", name, meta, f"has a peer "
                                          f"request from {other!r} (id {r['id']}) pending, but "
                                          f"{name!r} and {other!r} are peers already"))
                else:
                    continue
                if found[-1] is not None:
                    drop_requests.add(other)
            for d in doc.get("peer_denials", []):
                other = d["pod_name"]
                if other in others and view.read(other)[0] == "missing":
                    found.append(self.add("peer-request-dangling", name, meta, f"records a "
                                          f"denied peer request from {other!r}, but there is "
                                          f"no Pod {other!r}"))
                    if found[-1] is not None:
                        drop_denials.add(other)
            found = [p for p in found if p is not None]

            def repair():
                for other in drop_requests:
                    metadata.drop_requests(doc, other)
                for other in drop_denials:
                    metadata.drop_denials(doc, other)
                view.locked.write_one(name, doc)

            self.attempt_all(found, repair)

    # -- temp files and staging directories -----------------------------------
    def check_temps(self) -> None:
        if "temp-file" not in self.wanted:
            return
        # A leftover journal's Pods hold the records it staged: its rollback (reported
        # as journal-leftover, when that is checked) removes them.
        journaled = ({n for j in self.leftover for n in j.pods}
                     if "journal-leftover" in self.wanted else set())
        for name, pod in sorted(self.pods.items()):
            if not pod.temps or name in journaled:
                continue
            lock = self.state.lock_path(name)
            if is_locked(lock):
                continue  # a writer is at work: its temp file is not leftover
            pod_dir = self.state.pod_dir(name)
            stale = [pod_dir / t for t in pod.temps if _lstat(pod_dir / t) is not None]
            for path in stale:
                p = self.add("temp-file", name, path, "leftover temp file of an interrupted "
                             "atomic write")
                self.attempt(p, lambda path=path: self.remove_pod_temp(name, path))

    def remove_pod_temp(self, name: str, path: Path) -> str | None:
        with lock_pods(self.state, [name]):
            pass  # taking the lock removes the Pod's leftover temp files
        return "still there" if _lstat(path) is not None else None

    def check_staging(self, path: Path, pod: str, mark: str, tag: str) -> None:
        if "staging-dir" not in self.wanted or is_locked(self.state.lock_path(pod)):
            return
        if mark == REMOVED_MARK:
            if (self.state.journal_dir / f"{tag}.toml").exists():
                return  # its journal's rollback puts it back: reported as journal-leftover
            what = f"an interrupted removal of Pod {pod!r} (committed)"
        else:
            what = f"an interrupted creation of Pod {pod!r}"
        if _lstat(path) is None:
            return
        p = self.add("staging-dir", pod, path, f"leftover directory of {what}")
        self.attempt(p, lambda: self.remove_staging(path, pod, mark, tag))

    def remove_staging(self, path: Path, pod: str, mark: str, tag: str) -> str | None:
        with lock_pods(self.state, [pod]):
            # Under the lock any journal naming POD has been rolled back, so a
            # removal trash still here belongs to a committed removal.
            if mark == REMOVED_MARK and (self.state.journal_dir / f"{tag}.toml").exists():
                return "its journal is still there"
            if _lstat(path) is not None:
                shutil.rmtree(path)
        return None

    # -- runtime hints --------------------------------------------------------
    def check_runtime(self) -> None:
        if not self.wanted & {"stale-socket", "stale-pid"}:
            return
        # Default socket paths live in the run directories: list them once
        # instead of looking for a file per Pod.
        run_dirs = (self.state.run_dir, self.state.short_run_dir())
        sockets: dict[Path, str] = {}  # socket path -> Pod name
        for run_dir in run_dirs:
            try:
                entries = os.listdir(run_dir)
            except OSError:
                continue
            for entry in entries:
                if entry.endswith(".sock") and is_valid_name(entry[:-5]):
                    sockets[run_dir / entry] = entry[:-5]
        listed = {str(d) for d in run_dirs}
        for name, pod in sorted(self.pods.items()):
            hint = pod.socket_path
            if isinstance(hint, str) and hint and os.path.dirname(hint) not in listed:
                sockets.setdefault(Path(hint), name)
            pid = pod.pid
            if isinstance(pid, int) and not isinstance(pid, bool) and pod.status == "ok":
                self.check_pid(name, pid)
        candidates = []
        for path, name in sockets.items():
            st = _lstat(path)
            if st is None or not stat.S_ISSOCK(st.st_mode):
                continue
            self.checked["sockets"] += 1
            if not self.runtime_running(name):
                candidates.append((path, name))
        if "stale-socket" not in self.wanted or not candidates:
            return
        probes = probe_many([p for p, _ in candidates], timeout=PROBE_TIMEOUT)
        for (path, name), result in zip(candidates, probes):
            # Only a refused connection proves nobody listens: a socket that
            # accepts but does not speak the protocol belongs to someone.
            if result["error"] != "connection refused":
                continue
            p = self.add("stale-socket", name, path, f"socket file no process serves "
                         f"({result['error']}); the Pod is not running")
            self.attempt(p, lambda path=path, name=name: self.remove_socket(path, name))

    def runtime_running(self, name: str) -> bool:
        path = self.state.runtime_lock_path(name)
        st = _lstat(path)
        return st is not None and stat.S_ISREG(st.st_mode) and bool(is_locked(path))

    def pid_problem(self, name: str, pid: int) -> str | None:
        if not pid_alive(pid):
            return f"metadata records pid {pid}, which is not running"
        if not self.runtime_running(name):
            return f"metadata records pid {pid}, which does not hold the Pod's runtime lock"
        holder = lock_holder_pid(self.state.runtime_lock_path(name))
        if holder is not None and holder != pid:
            return f"metadata records pid {pid}, but the live Pod is pid {holder}"
        return None

    def check_pid(self, name: str, pid: int) -> None:
        why = self.pid_problem(name, pid)
        if why is None:
            return
        p = self.add("stale-pid", name, self.state.metadata_path(name), why)
        self.attempt(p, lambda: self.clear_pid(name, pid))

    def clear_pid(self, name: str, pid: int) -> str | None:
        with lock_pods(self.state, [name]) as locked:
            pod = locked.read(name)
            runtime = (pod.doc or {}).get("runtime") or {}
            if runtime.get("pid") == pid and self.pid_problem(name, pid):
                del runtime["pid"]
                locked.write_one(name, pod.doc)
        return None

    def remove_socket(self, path: Path, name: str) -> str | None:
        with lock_pods(self.state, [name]):
            if self.state.pod_dir(name).is_dir():
                # Holding the runtime lock ourselves: no Pod can start meanwhile.
                with if_free(self.state.runtime_lock_path(name)) as held:
                    if not held:
                        return GONE  # the Pod has started meanwhile: its socket now
                    if _socket_refused(path):
                        os.unlink(path)
            elif _socket_refused(path):
                os.unlink(path)
        return None

    # -- session logs ---------------------------------------------------------
    def check_sessions(self) -> None:
        # session-unreadable is reported by the scan: whole lines do not change.
        for name, pod in sorted(self.pods.items()):
            self.checked["sessions"] += pod.has_session
            if pod.torn is not None and "session-torn" in self.wanted:
                self.check_torn(name, pod.torn)

    def set_aside_torn(self, name: str, path: Path) -> str | None:
        with if_free(self.state.runtime_lock_path(name)) as free:
            if not free:
                return "the Pod is running; stop it and run `yoi doctor --fix` again"
            session.set_aside_torn_tail(path)
        return None

    def check_torn(self, name: str, torn: tuple[int, int, str]) -> None:
        path = self.state.session_path(name)
        running = self.runtime_running(name)
        if running:
            # A live Pod may be appending this very line: look again a moment later.
            time.sleep(0.05)
        try:
            again = session.torn_tail(path)
        except OSError:
            return
        # Changed since the scan: it was being written (a Pod that has stopped
        # since, or is still at it). What a stopped Pod left is what counts.
        if again != torn and (running or again is None):
            return
        torn = again
        p = self.add("session-torn", name, path, f"last line is torn: {torn[2]}",
                     fixable=not running)
        if p is not None and running:
            p.message += " (the Pod is running; stop it and run `yoi doctor --fix` again)"
        self.attempt(p, lambda: self.set_aside_torn(name, path))

    # -- queues ---------------------------------------------------------------------
    def check_queues(self) -> None:
        if not self.wanted & {"queue-torn", "queue-unreadable", "queue-delivered"}:
            return
        for name, pod in sorted(self.pods.items()):
            if not pod.has_queue:
                continue
            # Read under the Pod's lock, which every append and drain holds: a
            # record half-written a moment ago is not taken for a torn one.
            locks = (lock_pods(self.state, [name]) if self.repairing
                     else hold_locks(self.state, [name]))
            try:
                with locks:
                    self.check_queue(name)
            except YoiError:
                continue  # busy: a sender or the Pod is at work on it right now

    def check_queue(self, name: str) -> None:
        path = self.state.queue_path(name)
        try:
            contents = offline.read(path)
        except YoiError as e:  # replaced since the scan, or cannot be read
            self.add("unreadable", name, path, e.message)
            return
        damaged = []
        if contents.torn is not None:
            damaged.append(self.add("queue-torn", name, path, f"the last record is torn "
                                    f"({len(contents.torn)} bytes without a newline)"))
        if contents.bad:
            lines = ", ".join(str(n) for n, _ in contents.bad[:5])
            damaged.append(self.add(
                "queue-unreadable", name, path, f"{len(contents.bad)} line(s) are not "
                f"message records: line {lines}{' ...' if len(contents.bad) > 5 else ''}"))
        damaged = [p for p in damaged if p is not None]
        if damaged:
            def set_aside() -> None:
                offline.set_aside_damage(path, contents)
            self.attempt_all(damaged, set_aside)
        if "queue-delivered" not in self.wanted or self.runtime_running(name):
            return  # a live Pod drops them itself, and its log is still growing
        # A message committed without its handler run stays: the Pod's next start runs it.
        doc = read_pod_file(self.state, name).doc or {}
        handler = bool((doc.get("runtime") or {}).get("exec"))
        delivered = self.delivered_ids(name, {r["id"] for r in contents.records}, handler)
        if not delivered:
            return
        p = self.add("queue-delivered", name, path, f"{len(delivered)} queued message(s) are "
                     f"in the session log already: {', '.join(sorted(delivered)[:5])}"
                     f"{' ...' if len(delivered) > 5 else ''}")

        def drop() -> str | None:
            with if_free(self.state.runtime_lock_path(name)) as free:
                if not free:
                    return "the Pod has started meanwhile; it drops them itself"
                offline.rewrite(path, [r for r in contents.records if r["id"] not in delivered])
            return None

        self.attempt(p, drop)

    def delivered_ids(self, name: str, ids: set[str], handled: bool = False) -> set[str]:
        """Which of IDS a message in NAME's session log carries (read forward, once);
        with HANDLED, only those whose handler_result is in the log too."""
        found, ran = set(), set()
        for line, entry in session.entries(self.state.session_path(name)):
            key = session.index_key(entry) if entry is not None and b'"id"' in line else None
            if key in ids:
                found.add(key)
            elif key is not None and key.startswith(session.HANDLED_PREFIX):
                ran.add(key[len(session.HANDLED_PREFIX):])
        return found & ran if handled else found


def _cycles(parents: dict[str, str | None]) -> list[list[str]]:
    """The cycles of the parent links PARENTS (name -> parent), each once, each starting
    at its smallest name."""
    found, done = [], set()
    for start in sorted(parents):
        path, at = [], start
        while at is not None and at in parents and at not in done and at not in path:
            path.append(at)
            at = parents[at]
        if at in path:
            cycle = path[path.index(at):]
            first = cycle.index(min(cycle))
            found.append(cycle[first:] + cycle[:first])
        done.update(path)
    return found


def _repaired_peers(entries: list[dict], drop: set[str], merge: bool) -> list[dict]:
    """ENTRIES without the peers in DROP, duplicates merged into the first (if MERGE).

    Not ``metadata.drop_peer``: one pass both drops and merges, keeping the
    first entry's fields."""
    out, first = [], {}
    for entry in entries:
        other = entry["pod_name"]
        if other in drop:
            continue
        if merge and other in first:
            for key, value in entry.items():
                first[other].setdefault(key, value)
            continue
        first[other] = entry
        out.append(entry)
    return out


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
