"""Multi-Pod transactions: sorted locks, an intent journal, exact rollback, recovery.

A change that touches several Pods' metadata (peer register/remove, Pod
removal, spawning a child Pod, removing a tree of them) runs as:

1. take every Pod's metadata lock in sorted name order (no deadlock), rolling
   back first any leftover journal that names one of them;
2. write ``journal/TXID.toml`` naming every locked Pod and holding each changed
   file's exact prior bytes and the intended new ones, fsynced;
3. write every new record to a temp file beside its target and fsync them one
   after the other (one wait for the disk, not one per file), then apply the
   changes one by one (rename of a record into place; rename of a removed
   Pod's directory aside; a created Pod's directory built aside and renamed
   into place), then fsync their directories: after a power cut each record
   is its old or its new self, never torn;
4. delete the journal: this is the commit point. Nothing after it is undone.

An ordinary error in step 3 restores every file to its exact prior bytes and
deletes the journal. After a crash the journal stays; the next process that
takes the lock of any Pod it names (and ``yoi doctor --fix``) rolls it back
first, so every reader that takes locks sees all of a change or none of it.
Rollback compares before it writes, so it is idempotent and can itself be
interrupted and re-run. A created Pod is rolled back by renaming its
directory aside and deleting it: it did not exist when its journal was
written under its lock, so whatever is at its path is what the transaction
made.

Fault-injection points passed to ``yoi.faults.fault`` (a testing aid), in the
order a transaction reaches them: ``after-lock`` (every ``lock_pods``, before
recovery), ``after-journal``, ``before-write-N`` / ``after-write-N`` for the
Nth change, ``before-journal-remove``, ``after-journal-remove``; during a
rollback (recovery, or the undo after an ordinary error)
``recovery-after-write-N`` and ``recovery-before-journal-remove``; plus
``atomic-before-replace`` inside every atomic write (in a transaction: the
journal first, then each metadata file; in a recovery: each restored file).
"""

from __future__ import annotations

import errno
import os
import re
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from yoi import metadata
from yoi.atomic import (NotRegularFile, atomic_write, discard, fsync_dir, read_bytes_nofollow,
                         remove_temp_files, replace_staged, stage, sync_files, sync_parents)
from yoi.errors import CorruptMetadata, NotFound, StorageError, YoiError
from yoi.faults import fault
from yoi.lock import FileLock
from yoi.names import check_name, is_valid_name
from yoi.state import State, make_private_dir, refuse_symlink

# Directories beside the Pods: ``.NAME.removed-TXID`` (a Pod set aside by a
# removal) and ``.NAME.creating-PID`` (a create building it). NAME may itself
# contain ".removed-" or ".creating-", so the tag is parsed strictly.
REMOVED_MARK = ".removed-"
CREATING_MARK = ".creating-"
TXID_RE = re.compile(r"[0-9]+-[0-9]+-[0-9a-f]+\Z", re.ASCII)
_PID_RE = re.compile(r"[0-9]+\Z", re.ASCII)


def leftover_dir_owner(entry: str) -> tuple[str, str, str] | None:
    """``(pod, mark, tag)`` if ENTRY under pods/ is a removal's or a create's directory."""
    if not entry.startswith("."):
        return None
    for mark, tag_re in ((REMOVED_MARK, TXID_RE), (CREATING_MARK, _PID_RE)):
        pod, sep, tag = entry[1:].rpartition(mark)
        if sep and is_valid_name(pod) and tag_re.match(tag):
            return pod, mark, tag
    return None


# Plain classes, not dataclasses: every command pays for its imports, and
# building dataclasses at import time costs milliseconds.

class Pod:
    """One Pod's metadata as read under its lock (``raw`` None: no such Pod)."""

    __slots__ = ("name", "path", "raw", "doc")

    def __init__(self, name: str, path: str, raw: bytes | None, doc: dict | None):
        self.name, self.path, self.raw, self.doc = name, path, raw, doc

    @property
    def exists(self) -> bool:
        return self.raw is not None


class Change:
    """One step of a transaction: ``write`` NEW to POD's metadata, ``create`` POD with
    the record NEW (a Pod that does not exist), or ``remove`` POD."""

    __slots__ = ("pod", "action", "new")

    def __init__(self, pod: str, action: str, new: bytes | None = None):
        self.pod, self.action, self.new = pod, action, new


class Journal:
    __slots__ = ("path", "txid", "pods", "changes")

    def __init__(self, path: Path, txid: str, pods: list[str], changes: list[dict]):
        self.path, self.txid, self.pods, self.changes = path, txid, pods, changes


def read_pod_file(state: State, name: str) -> Pod:
    """Read NAME's metadata (no lock taken here); raises CorruptMetadata."""
    # Paths as strings: listing 10,000 Pods built 30,000 Path objects here.
    pod_dir = os.path.join(state.root, "pods", check_name(name))
    refuse_symlink(pod_dir, "Pod directory")
    path = os.path.join(pod_dir, "metadata.toml")
    try:
        raw = read_bytes_nofollow(path)
    except FileNotFoundError:
        if os.path.isdir(pod_dir):
            raise CorruptMetadata(f"{path}: missing (the Pod directory exists)", path=str(path))
        return Pod(name, path, None, None)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise CorruptMetadata(f"{path} is a symlink; refusing to follow it", path=str(path))
        if e.errno == errno.ENOTDIR:
            raise CorruptMetadata(f"{pod_dir} is not a directory", path=pod_dir)
        if isinstance(e, NotRegularFile):  # a FIFO, a device: never read (nor waited on)
            raise CorruptMetadata(f"{path} is not a regular file; never read", path=str(path))
        raise StorageError(f"cannot read {path}: {e.strerror}", path=str(path))
    return Pod(name, path, raw, metadata.parse(raw, path, expect_name=name))


def read_doc(state: State, name: str) -> dict | None:
    """NAME's record, or None if there is none or it cannot be read (for a reader that
    only skips what it cannot use)."""
    try:
        return read_pod_file(state, name).doc
    except YoiError:
        return None


class RecordCache:
    """Records parsed again only when their file changed (its inode, size and times):
    for a long-lived reader such as a Pod's loop or its child watcher (one cache per
    thread). ``read(name)`` is NAME's record, or None if there is no such Pod;
    CorruptMetadata or StorageError as ``read_pod_file``."""

    def __init__(self, state: State):
        self.state = state
        self._cache: dict[str, tuple] = {}  # Pod name -> (stat key, record)

    def read(self, name: str) -> dict | None:
        path = self.state.metadata_path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror}", path=str(path))
        key = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        cached = self._cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, read_pod_file(self.state, name).doc)
            self._cache[name] = cached
        return cached[1]


# -- journals -----------------------------------------------------------------

def _journal_entries(state: State) -> list[str]:
    try:
        return sorted(os.listdir(state.journal_dir))
    except FileNotFoundError:
        return []


_in_journals: dict[str, tuple[tuple[int, int], list[frozenset[str]]]] = {}
JOURNAL_STILL_NS = 200_000_000


def journaled_together(state: State, *names: str) -> bool:
    """Whether one leftover (or in-progress) journal names all of NAMES: a change
    between them may show in their records without being committed yet. Cheap
    when nothing changed: the journal directory is listed and its journals parsed
    again only when it changed."""
    wanted = set(names)
    return any(wanted <= pods for pods in _journal_pod_sets(state))


def _journal_pod_sets(state: State) -> list[frozenset[str]]:
    path = str(state.journal_dir)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    key = (st.st_ino, st.st_mtime_ns)
    cached = _in_journals.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    sets = [frozenset(j.pods) for j in list_journals(state)]
    # A directory's mtime moves in clock ticks: two changes within one leave it alone,
    # so a listing is kept only once its directory has been still for a while.
    if time.time_ns() - st.st_mtime_ns > JOURNAL_STILL_NS:
        _in_journals[path] = (key, sets)
    return sets


def list_journals(state: State, entries: list[str] | None = None) -> list[Journal]:
    """Parsed journals (unparseable ones are left for ``yoi doctor``).

    ENTRIES: the journal directory's listing, if the caller already has it.
    """
    if entries is None:
        entries = _journal_entries(state)
    out = []
    for entry in entries:
        if entry.startswith(".") or not entry.endswith(".toml"):
            continue
        try:
            out.append(load_journal(state.journal_dir / entry))
        except (CorruptMetadata, FileNotFoundError):
            continue
    return out


def load_journal(path: Path) -> Journal:
    """Read and check a journal; CorruptMetadata naming PATH if it is not one of ours.

    The checks matter: a rollback writes the files a journal names, so one
    damaged from outside must not name a Pod it holds no lock for, a path as
    its txid, or an entry a rollback cannot follow.
    """
    doc = metadata.loads(read_bytes_nofollow(path), path, what="journal ")
    problem = _journal_problem(doc)
    if problem:
        raise CorruptMetadata(f"{path}: journal is not valid: {problem}", path=str(path))
    return Journal(path, doc["txid"], list(doc["pods"]), list(doc["changes"]))


def _journal_problem(doc: dict) -> str | None:
    txid, pods, changes = doc.get("txid"), doc.get("pods"), doc.get("changes")
    if not isinstance(txid, str) or not TXID_RE.match(txid):
        return f"txid {txid!r} is not MILLIS-PID-HEX"
    if not isinstance(pods, list) or not pods or not all(is_valid_name(p) for p in pods):
        return f"pods {pods!r} is not a list of Pod names"
    if not isinstance(changes, list):
        return "changes must be an array of tables"
    for i, ch in enumerate(changes):
        if not isinstance(ch, dict) or ch.get("pod") not in pods:
            return f"changes[{i}] does not name one of the journal's Pods"
        if ch.get("action") == "write":
            if not isinstance(ch.get("prior"), str):
                return f"changes[{i}] has no prior text to restore"
        elif ch.get("action") not in ("remove", "create"):
            return f"changes[{i}] has an unknown action {ch.get('action')!r}"
    return None


def _trash_path(state: State, name: str, txid: str) -> Path:
    return state.pods_dir / f".{name}{REMOVED_MARK}{txid}"


def rollback(state: State, journal: Journal) -> None:
    """Put every file the journal names back to its prior bytes; delete the journal.

    Caller holds the locks of every Pod in ``journal.pods``.
    """
    for i, ch in enumerate(journal.changes, 1):
        name = ch["pod"]
        if ch["action"] == "write":
            path = state.metadata_path(name)
            prior = ch["prior"].encode("utf-8")
            try:
                current = read_bytes_nofollow(path)
            except FileNotFoundError:
                current = None
            if current != prior:
                atomic_write(path, prior)
        elif ch["action"] == "remove":
            trash = _trash_path(state, name, journal.txid)
            if trash.exists() and not state.pod_dir(name).exists():
                os.rename(trash, state.pod_dir(name))
                fsync_dir(state.pods_dir)
        elif ch["action"] == "create":
            _uncreate(state, name, journal.txid)
        fault(f"recovery-after-write-{i}")
    fault("recovery-before-journal-remove")
    try:
        os.unlink(journal.path)
    except FileNotFoundError:
        pass
    fsync_dir(journal.path.parent)


def staging_path(state: State, name: str, pid: int | None = None) -> Path:
    """Where a Pod directory is built before it is renamed into place."""
    return state.pods_dir / f".{name}{CREATING_MARK}{os.getpid() if pid is None else pid}"


def create_pod_dir(state: State, name: str, record: bytes) -> None:
    """Build Pod NAME's directory (RECORD as its metadata, an empty session log) aside
    and rename it into place: a crash leaves no Pod or a whole one, never part of one.

    Caller holds NAME's lock and knows that it does not exist. On failure the
    staging directory is removed and the error raised.
    """
    staging = staging_path(state, name)
    try:
        if os.path.lexists(staging):
            remove_tree(staging)
        make_private_dir(staging)
        atomic_write(staging / "metadata.toml", record)
        fd = os.open(staging / "session.jsonl",
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(staging)
        os.rename(staging, state.pod_dir(name))
    except BaseException:
        remove_tree(staging)
        raise


def _uncreate(state: State, name: str, txid: str) -> None:
    """Undo the creation of Pod NAME by the transaction TXID (see the module docstring):
    its directory is renamed aside (so it disappears at once), then deleted."""
    for pid in {_pid_of_txid(txid), os.getpid()}:
        staging = staging_path(state, name, pid) if pid is not None else None
        if staging is not None and os.path.lexists(staging):
            remove_tree(staging)  # an interrupted build, or an interrupted undo
    pod_dir = state.pod_dir(name)
    if os.path.lexists(pod_dir):
        trash = staging_path(state, name)
        os.rename(pod_dir, trash)
        fsync_dir(state.pods_dir)
        remove_tree(trash)


def rolled_back_bytes(state: State, journal: Journal, name: str) -> tuple[bool, bytes | None]:
    """What rolling back JOURNAL would make NAME's metadata: (applies, bytes or None).

    Used by ``yoi doctor`` to see a leftover transaction's outcome without
    applying it.
    """
    for ch in journal.changes:
        if ch.get("pod") != name:
            continue
        if ch.get("action") == "write" and isinstance(ch.get("prior"), str):
            return True, ch["prior"].encode("utf-8")
        if ch.get("action") == "create":
            return True, None  # no such Pod
        if ch.get("action") == "remove":
            trash = _trash_path(state, name, journal.txid)
            if not os.path.lexists(state.pod_dir(name)) and os.path.lexists(trash):
                try:
                    return True, read_bytes_nofollow(trash / "metadata.toml")
                except OSError:
                    return True, b""  # restored, but unreadable: corrupt
    return False, None


def _cleanup_journal_temps(state: State, entries: list[str]) -> None:
    """Remove journal temp files (in the listing ENTRIES) of writers no longer alive."""
    for entry in entries:
        if not entry.startswith(".") or ".tmp-" not in entry:
            continue
        pid = _pid_of_txid(entry[1:].split(".toml")[0])
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            try:
                os.unlink(state.journal_dir / entry)
            except FileNotFoundError:
                pass


def _pid_of_txid(txid: str) -> int | None:
    parts = txid.split("-")
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process PID exists; False for what cannot be a pid (0, -1, 2**40)."""
    if not 0 < pid < 2**31:
        return False  # os.kill would signal a process group, or overflow
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False  # no such process, or a number no process can have
    except PermissionError:
        return True
    return True


def new_txid() -> str:
    return f"{time.time_ns() // 1_000_000}-{os.getpid()}-{os.urandom(4).hex()}"


# -- locking with recovery ----------------------------------------------------

class Locked:
    """The metadata locks of a set of Pods, with their leftover journals rolled back."""

    def __init__(self, state: State, names: set[str]):
        self.state = state
        self.names = names
        self._raw: dict[str, bytes | None] = {}  # bytes read under the locks, until a write

    def read(self, name: str) -> Pod:
        assert name in self.names, f"{name} is not locked"
        pod = read_pod_file(self.state, name)
        self._raw[name] = pod.raw
        return pod

    def require(self, name: str) -> Pod:
        pod = self.read(name)
        if not pod.exists:
            raise NotFound(f"no such Pod: {name}", pod_name=name)
        return pod

    def write_one(self, name: str, doc: dict) -> None:
        """Replace one Pod's metadata (a single-file change needs no journal)."""
        assert name in self.names
        self._raw.pop(name, None)
        path = self.state.metadata_path(name)
        try:
            atomic_write(path, metadata.dump_record(doc))
        except OSError as e:
            where = e.filename or str(path)
            raise StorageError(f"cannot write {where}: {e.strerror or e}", path=where) from e

    def commit(self, changes: list[Change]) -> None:
        """Apply CHANGES as one transaction (see module docstring)."""
        if not changes:
            return
        for ch in changes:
            assert ch.pod in self.names, f"{ch.pod} is not locked"
        journal = self._write_journal(new_txid(), changes)
        state = self.state
        staged: dict[int, Path] = {}  # change number -> its new record, not yet in place
        try:
            fault("after-journal")
            # Every new record is written and synced before the first is renamed
            # into place: one wait for the disk, and after a power cut each record
            # is its old or its new self, never a torn one.
            for i, ch in enumerate(changes, 1):
                if ch.action == "write":
                    staged[i] = stage(state.metadata_path(ch.pod), ch.new)
            sync_files({tmp: state.metadata_path(changes[i - 1].pod)
                        for i, tmp in staged.items()})
            for i, ch in enumerate(changes, 1):
                fault(f"before-write-{i}")
                if ch.action == "write":
                    replace_staged(staged.pop(i), state.metadata_path(ch.pod))
                elif ch.action == "create":
                    create_pod_dir(state, ch.pod, ch.new)
                    fsync_dir(state.pods_dir)  # the rename, before the commit point
                else:
                    os.rename(state.pod_dir(ch.pod), _trash_path(state, ch.pod, journal.txid))
                    fsync_dir(state.pods_dir)
                fault(f"after-write-{i}")
            sync_parents([state.metadata_path(ch.pod) for ch in changes if ch.action == "write"])
            fault("before-journal-remove")
            os.unlink(journal.path)  # the commit point
        except BaseException as e:
            for tmp in staged.values():
                discard(tmp)
            _undo(state, journal, e)
            raise
        try:
            fault("after-journal-remove")
            fsync_dir(journal.path.parent)
        except OSError:
            # Committed: undoing now could leave one side new and one old. If
            # the unlink is lost in a power cut, recovery rolls the whole
            # change back, which is still all-or-nothing.
            pass
        for ch in changes:
            if ch.action == "remove":
                remove_tree(_trash_path(state, ch.pod, journal.txid))

    def _write_journal(self, txid: str, changes: list[Change]) -> Journal:
        """Write (and fsync) the journal of CHANGES: every file's exact prior bytes."""
        entries = []
        for ch in changes:
            entry = {"pod": ch.pod, "action": ch.action}
            if ch.action == "write":
                # What the caller read under these locks is still what is on disk.
                prior = (self._raw[ch.pod] if ch.pod in self._raw
                         else read_pod_file(self.state, ch.pod).raw)
                if prior is None:
                    raise NotFound(f"no such Pod: {ch.pod}", pod_name=ch.pod)
                entry["prior"] = prior.decode("utf-8")
                entry["new"] = ch.new.decode("utf-8")
            elif ch.action == "create":
                entry["new"] = ch.new.decode("utf-8")
            entries.append(entry)
        self._raw.clear()  # from here on the files change
        # The journal names every locked Pod, not only the changed ones: a
        # command that later locks any of them (e.g. the source of a register
        # that only had to write the target) must roll it back before reading.
        jdoc = {"schema": 1, "txid": txid, "pid": os.getpid(),
                "created_at": metadata.utcnow(),
                "pods": sorted(self.names), "changes": entries}
        jpath = self.state.journal_dir / f"{txid}.toml"
        try:
            atomic_write(jpath, metadata.dumps(jdoc))
        except OSError as e:
            # atomic_write can fail after its rename (directory fsync): no
            # metadata file has changed, so the journal must not outlive us.
            try:
                os.unlink(jpath)
            except OSError:
                pass
            raise StorageError(f"cannot write journal {jpath}: {_describe(e)}; "
                               "nothing changed") from e
        return Journal(jpath, txid, jdoc["pods"], entries)


def _undo(state: State, journal: Journal, e: BaseException) -> None:
    """Roll back after the failure E; raise StorageError for an I/O failure."""
    try:
        rollback(state, journal)
    except OSError as e2:
        raise StorageError(
            f"change failed ({_describe(e)}) and so did its rollback "
            f"({_describe(e2)}); journal {journal.path} is kept: the next command on "
            "these Pods or `yoi doctor --fix` will restore the prior state") from e
    if isinstance(e, OSError):
        raise StorageError(f"change failed and was rolled back: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return str(e) or type(e).__name__


@contextmanager
def hold_locks(state: State, names, timeout: float | None = None):
    """Hold the metadata locks of NAMES (sorted: no deadlock), without recovery.

    For readers that must see no change in progress but may not write
    (``yoi doctor`` without ``--fix``); everything else uses ``lock_pods``.
    """
    timeout = state.lock_timeout if timeout is None else timeout
    locks = []
    try:
        for name in sorted(set(names)):
            locks.append(FileLock(state.lock_path(name), timeout,
                                  label=f"Pod {name!r}").acquire())
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


@contextmanager
def lock_pods(state: State, names, timeout: float | None = None):
    """Lock NAMES (sorted), roll back journals naming them, yield a ``Locked``.

    A leftover journal that names a Pod outside NAMES needs that Pod's lock
    too before it can be rolled back: then every lock is dropped and the
    larger set taken, in sorted order again.
    """
    state.ensure()
    wanted = set(names)
    while True:
        held = ExitStack()
        try:
            held.enter_context(hold_locks(state, wanted, timeout))
            fault("after-lock")
            listing = _journal_entries(state)  # one listing serves both uses below
            journals = [j for j in list_journals(state, listing) if wanted & set(j.pods)]
            needed = set().union(*(j.pods for j in journals)) if journals else set()
            if needed <= wanted:
                # Newest first: with several, the oldest prior bytes win.
                for j in reversed(journals):
                    rollback(state, j)
                _cleanup_journal_temps(state, listing)
                for name in wanted:
                    remove_temp_files(state.pods_dir / name)
                break
        except BaseException:
            held.close()
            raise
        held.close()
        wanted |= needed
    with held:
        yield Locked(state, wanted)


def remove_trash(state: State, name: str) -> None:
    """Delete NAME's leftover directories: a committed removal, an interrupted create.

    Caller holds NAME's lock, so no live process owns any of them. Only NAME's
    own: ``.a.removed-1.removed-TXID`` belongs to Pod ``a.removed-1``, whose
    removal may still be rolled back from it.
    """
    try:
        entries = os.listdir(state.pods_dir)
    except FileNotFoundError:
        return
    for entry in entries:
        owner = leftover_dir_owner(entry)
        if owner is not None and owner[0] == name:
            remove_tree(state.pods_dir / entry)


def remove_tree(path: Path) -> None:
    """Delete a directory tree, whatever is left of it."""
    import shutil  # measured: ~2 ms that a peer register does not need
    shutil.rmtree(path, ignore_errors=True)
