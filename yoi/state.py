"""The state directory: where every file lives, and how it is resolved.

Resolution: ``--state-dir`` > ``$YOI_HOME`` > ``~/.yoi``. Directories are created
0700 on first write, files 0600. Nothing is created by merely resolving.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from yoi import timeouts
from yoi.errors import Failed, NotFound
from yoi.names import check_name, is_valid_name

SUN_PATH_MAX = 107  # bytes usable in sockaddr_un.sun_path, without the NUL
SHORT_DIR_PREFIX = "yoi-"  # + 16 hex digits: a short socket directory (``short_run_dir``)


class State:
    """A resolved state directory plus the settings every operation shares."""

    __slots__ = ("root", "lock_timeout")

    def __init__(self, root: Path, lock_timeout: float = timeouts.DEFAULT):
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "lock_timeout", lock_timeout)

    def __setattr__(self, name, value):
        raise AttributeError("State is immutable")

    def __eq__(self, other):
        return (isinstance(other, State) and self.root == other.root
                and self.lock_timeout == other.lock_timeout)

    def __hash__(self):
        return hash((self.root, self.lock_timeout))

    def __repr__(self):
        return f"State(root={str(self.root)!r}, lock_timeout={self.lock_timeout!r})"

    @classmethod
    def resolve(cls, state_dir: str | os.PathLike | None = None,
                lock_timeout: float | None = None) -> "State":
        if state_dir is None or str(state_dir) == "":
            state_dir = os.environ.get("YOI_HOME") or os.path.join(
                os.path.expanduser("~"), ".yoi")
        if lock_timeout is None:
            raw = os.environ.get("YOI_LOCK_TIMEOUT")
            lock_timeout = (timeouts.parse(raw, "YOI_LOCK_TIMEOUT", zero_ok=True) if raw
                            else timeouts.DEFAULT)
        return cls(Path(os.path.abspath(os.fspath(state_dir))), float(lock_timeout))

    # -- layout -------------------------------------------------------------
    @property
    def pods_dir(self) -> Path:
        return self.root / "pods"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def pod_dir(self, name: str) -> Path:
        return self.pods_dir / check_name(name)

    def metadata_path(self, name: str) -> Path:
        return self.pod_dir(name) / "metadata.toml"

    def session_path(self, name: str) -> Path:
        return self.pod_dir(name) / "session.jsonl"

    def session_index_path(self, name: str) -> Path:
        """The id index of the session log (a cache of it; see yoi.session.index)."""
        return self.pod_dir(name) / "session.index"

    def queue_path(self, name: str) -> Path:
        """Messages waiting for the Pod to start (see yoi.offline)."""
        return self.pod_dir(name) / "queue.jsonl"

    def runtime_lock_path(self, name: str) -> Path:
        return self.pod_dir(name) / "runtime.lock"

    def pod_log_path(self, name: str) -> Path:
        """Where a detached Pod process sends its own stdout/stderr."""
        return self.pod_dir(name) / "pod.log"

    def lock_path(self, name: str) -> Path:
        return self.locks_dir / f"{check_name(name)}.lock"

    def default_socket_path(self, name: str) -> Path:
        """STATE/run/NAME.sock, or a short per-state directory if that is too long."""
        return self.local_socket_path(name) or self.short_run_dir() / f"{name}.sock"

    def local_socket_path(self, name: str) -> Path | None:
        """STATE/run/NAME.sock, where every Pod of this state directory binds unless
        that path is too long for a socket (then None)."""
        path = os.path.join(self.root, "run", f"{check_name(name)}.sock")  # (a listing
        if len(os.fsencode(path)) <= SUN_PATH_MAX:  # computes thousands: one Path each)
            return Path(path)
        return None

    def socket_path(self, name: str, doc: dict | None = None) -> Path:
        """Where to reach NAME: the socket path its runtime recorded in DOC (its
        metadata), else where it would bind.

        The recorded path wins because the short-path fallback depends on the
        runtime's environment ($XDG_RUNTIME_DIR), which may differ from ours.
        """
        hint = ((doc or {}).get("runtime") or {}).get("socket_path")
        return Path(hint) if hint else self.default_socket_path(name)

    def short_run_dir(self) -> Path:
        """``$XDG_RUNTIME_DIR/yoi-HASH``, else ``TMPDIR/yoi-UID/yoi-HASH``: the
        directory above ``yoi-HASH`` is the fallback root (see ``socket_dir_chain``)."""
        # measured: tempfile costs ~5 ms, and `yoi pod send` needs neither module
        import hashlib
        import tempfile
        digest = hashlib.sha256(os.fsencode(str(self.root))).hexdigest()[:16]
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not base or not os.path.isdir(base):
            base = os.path.join(tempfile.gettempdir(), f"yoi-{os.getuid()}")
        return Path(base) / f"{SHORT_DIR_PREFIX}{digest}"

    def no_such_pod(self, name: str, role: str = "") -> NotFound:
        """"no such Pod: NAME[ (ROLE)]", saying so when the whole state directory is
        missing (a mistyped --state-dir or $YOI_HOME looks like a missing Pod)."""
        notes = [role] if role else []
        if not self.root.exists():
            notes.append(f"no state directory at {self.root}")
        extra = f" ({'; '.join(notes)})" if notes else ""
        return NotFound(f"no such Pod: {name}{extra}", pod_name=name)

    # -- creation -----------------------------------------------------------
    def ensure(self) -> None:
        """Create the state directory tree (0700) if it does not exist.

        The state directory itself may be a symlink; the directories inside it
        are never followed.
        """
        make_private_dir(self.root)
        for d in (self.pods_dir, self.locks_dir, self.journal_dir):
            refuse_symlink(d, "state directory entry")
            make_private_dir(d)

    def pod_names(self) -> list[str]:
        """Names of the entries under pods/ that look like Pods (sorted)."""
        try:
            entries = os.listdir(self.pods_dir)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if is_valid_name(e))


def make_private_dir(path: Path) -> None:
    """mkdir -p with mode 0700 for every directory this call creates."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise Failed(f"{path} exists and is not a directory")
        return
    except FileNotFoundError:
        make_private_dir(path.parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
    os.chmod(path, 0o700)  # umask may have narrowed or, oddly, not applied


def refuse_symlink(path: Path, what: str) -> None:
    """Raise if PATH is a symlink: state entries are never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise Failed(f"{what} {path} is a symlink; refusing to follow it")


# -- socket directories ---------------------------------------------------------

def socket_dir_chain(socket_dir: Path) -> list[Path]:
    """The directories a socket in SOCKET_DIR is only as safe as, outermost first.

    SOCKET_DIR itself and, for a short socket directory (``yoi-HASH``), the
    fallback root above it (``$XDG_RUNTIME_DIR``, or ``yoi-UID`` in the shared
    temp directory, which anyone could have created first). Past that root
    the path is the system's (``/tmp`` is sticky) or the state directory's.
    """
    name = socket_dir.name
    digest = name[len(SHORT_DIR_PREFIX):]
    if (name.startswith(SHORT_DIR_PREFIX) and len(digest) == 16
            and all(ch in "0123456789abcdef" for ch in digest)):
        return [socket_dir.parent, socket_dir]
    return [socket_dir]


def private_dir_problem(path: Path) -> str | None:
    """Why no socket in directory PATH can be trusted to be ours, or None.

    It must be a directory (not a symlink), owned by this user and writable
    by nobody else: otherwise another local user made it, or can put a
    socket of their own in it. A missing directory is no problem here (there
    is then no socket to trust).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
