"""No other local user can pose as a Pod.

With XDG_RUNTIME_DIR unset and a long state path, sockets live under
TMPDIR/yoi-UID/yoi-HASH/. Another user who creates that directory first, or
who serves a socket a client reaches, must not get a message: clients trust a
socket only if its directories are ours and private and the process serving
it runs as us; a Pod refuses to create or use such a directory.

These tests run a fake server as a throw-away user created for the test.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from yoi import protocol, store
from yoi.state import State


@pytest.fixture
def other_user():
    """(uid, gid) of a user created for this test and removed afterwards."""
    if os.getuid() != 0:
        pytest.skip("creating a user needs root")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"yoit{uuid.uuid4().hex[:10]}"
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                        name], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot create a user on this machine: {r.stderr.strip()}")
    try:
        import pwd
        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def system_tmp(monkeypatch):
    """A temp directory of our own standing in for /tmp (so that the machine's own
    /tmp/yoi-UID is never touched), with XDG_RUNTIME_DIR unset."""
    path = tempfile.mkdtemp(prefix="yoi-systmp-", dir="/tmp")
    try:
        os.chmod(path, 0o755)
        monkeypatch.setenv("TMPDIR", path)
        monkeypatch.setattr(tempfile, "tempdir", path)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def long_state(tmp_path, monkeypatch):
    """A state directory whose run/NAME.sock would not fit a socket address."""
    root = tmp_path / ("x" * 90) / "state"
    monkeypatch.setenv("YOI_HOME", str(root))
    state = State.resolve(root)
    store.create(state, "a")
    return state


class ForeignServer:
    """A fake Pod served by a forked child running as another user.

    It answers every connection with a snapshot and acknowledges the first
    ``notify`` it reads by its id (what a poser would do to make a sender
    print "delivered"); the child reports each connection and line it gets
    through a pipe.
    """

    def __init__(self, uid: int, gid: int, path: str):
        self.path = path
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                _serve(path, w)
            finally:
                os._exit(0)
        os.close(w)
        self.pid, self.reports = pid, r
        self.seen = b""
        self._read_until(b"ready\n")

    def _read_until(self, marker: bytes) -> None:
        deadline = time.monotonic() + 10
        while marker not in self.seen:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.reports], [], [], left)
            if not ready:
                raise AssertionError(f"the foreign server said {self.seen!r}")
            chunk = os.read(self.reports, 65536)
            if not chunk:
                raise AssertionError(f"the foreign server ended: {self.seen!r}")
            self.seen += chunk

    def stop(self) -> bytes:
        """Kill it; return what it reported after "ready"."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        while True:
            chunk = os.read(self.reports, 65536)
            if not chunk:
                break
            self.seen += chunk
        os.close(self.reports)
        return self.seen.split(b"ready\n", 1)[1]


def _serve(path: str, w: int) -> None:  # pragma: no cover - runs as the other user
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen(8)
    s.settimeout(60)
    os.write(w, b"ready\n")
    snapshot = protocol.event("snapshot", {"entries": [], "greeting": {}, "status": "idle"})
    while True:
        conn, _ = s.accept()
        os.write(w, b"connection\n")
        conn.settimeout(10)
        try:
            conn.sendall(snapshot)
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                line += chunk
            if line:
                os.write(w, b"got " + line)
                params = json.loads(line).get("params", {})
                conn.sendall(protocol.event("system_item", {"item": {
                    "kind": "notification", "message": params.get("message"),
                    "body": params.get("message"), "id": params.get("id")}}))
        except OSError:
            pass
        finally:
            conn.close()


def test_send_refuses_a_socket_in_a_fallback_directory_of_another_user(
        long_state, system_tmp, other_user, run_yoi):
    uid, gid = other_user
    sock = long_state.default_socket_path("a")
    root = sock.parent.parent  # TMPDIR/yoi-UID, the fallback root
    assert str(root) == os.path.join(system_tmp, f"yoi-{os.getuid()}")
    os.mkdir(root, 0o755)
    os.chown(root, uid, gid)  # the other user got there first
    server = ForeignServer(uid, gid, str(sock))
    try:
        r = run_yoi("pod", "send", "--timeout", "5", "--id", "secret-1", "a", "the secret")
        assert r.exit_code == 5, r
        assert "delivered" not in r.stdout, r
        assert r.stderr == (
            f"yoi: error: refusing the socket {sock}: the socket directory {root} is owned by "
            f"uid {uid}, not by this user (uid {os.getuid()}); another user could be posing "
            "as the Pod\n"), r
        r = run_yoi("pod", "list", "--json")
        assert r.json["pods"][0]["live"]["reachable"] is False, r
    finally:
        reported = server.stop()
    assert reported == b""  # never even connected to: nothing was delivered


def test_start_refuses_a_fallback_directory_of_another_user(
        long_state, system_tmp, other_user, run_yoi):
    uid, gid = other_user
    sock = long_state.default_socket_path("a")
    root = sock.parent.parent
    os.mkdir(root, 0o755)
    os.chown(root, uid, gid)
    why = f"socket directory {root} is owned by uid {uid}, not by this user (uid {os.getuid()})"
    r = run_yoi("pod", "start", "a", "--timeout", "10")
    assert r.exit_code == 5, r
    assert os.listdir(root) == []  # nothing created in it
    assert "exited with status 1 while starting" in r.stderr and why in r.stderr, r
    server = ForeignServer(uid, gid, str(sock))
    try:
        r = run_yoi("pod", "start", "a", "--timeout", "10")
        assert r.exit_code == 5 and why in r.stderr, r
        assert run_yoi("pod", "status", "a").stdout == "a: not running\n"
    finally:
        reported = server.stop()
    assert reported == b""  # start never took the foreign socket for its Pod's


def test_send_refuses_a_server_of_another_user_in_our_own_directory(
        state, system_tmp, other_user, run_yoi):
    """Even in a directory of ours, the process serving the socket must be us."""
    uid, gid = other_user
    store.create(state, "a")
    elsewhere = os.path.join(system_tmp, "elsewhere")
    os.mkdir(elsewhere, 0o755)
    os.chown(elsewhere, uid, gid)
    server = ForeignServer(uid, gid, os.path.join(elsewhere, "a.sock"))
    try:
        ours = state.default_socket_path("a")
        os.makedirs(ours.parent, mode=0o700)
        os.rename(server.path, ours)  # a socket file reaches its listener wherever it is
        r = run_yoi("pod", "send", "--timeout", "5", "--id", "secret-2", "a", "the secret")
        assert r.exit_code == 5, r
        assert r.stderr == (
            f"yoi: error: refusing the socket {ours}: the process serving it runs as uid {uid}, "
            f"not as this user (uid {os.getuid()}); another user could be posing as the "
            "Pod\n"), r
    finally:
        reported = server.stop()
    assert b"got" not in reported  # it was connected to, but nothing was written to it
