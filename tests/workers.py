"""Helper processes for tests that need a second (or ninth) real process.

Run as a script: ``python tests/workers.py MODE STATE_DIR ARGS...``; import it
from a test for ``start`` / ``stopping``, which start one and always stop it.
A worker that must be ready before the test goes on prints ``ready`` on stdout.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def start(mode: str, state_dir, *args, env: dict | None = None,
          wait_ready: bool = True) -> subprocess.Popen:
    """Start a worker; with WAIT_READY, return once it has printed ``ready``."""
    full_env = dict(os.environ)
    full_env.pop("YOI_FAULT", None)
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, str(SCRIPT), mode, str(state_dir), *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)
    if wait_ready:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            stop(proc)
            raise AssertionError(f"worker {mode} did not start: {line!r} {proc.stderr.read()}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def stopping(*procs: subprocess.Popen):
    """Yield PROCS and kill whichever of them still runs on the way out."""
    try:
        yield procs
    finally:
        for p in procs:
            stop(p)


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for a worker that ends by itself; fail with its stderr unless it exits 0."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    assert proc.returncode == 0, f"worker exited {proc.returncode}: {err}"
    return out


# -- the workers ----------------------------------------------------------------

def _state(state_dir: str):
    from yoi.state import State
    return State.resolve(state_dir)


def _hold_until_stdin_closes() -> None:
    print("ready", flush=True)
    sys.stdin.read()


def hold_lock(state_dir: str, name: str) -> None:
    """Hold NAME's metadata lock the way every command takes it (pid recorded)."""
    from yoi.lock import FileLock
    state = _state(state_dir)
    with FileLock(state.lock_path(name), timeout=5):
        _hold_until_stdin_closes()


def hold_runtime_lock(state_dir: str, name: str) -> None:
    """Be the live process of Pod NAME: flock its runtime.lock and record the pid."""
    import fcntl
    state = _state(state_dir)
    fd = os.open(state.runtime_lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    _hold_until_stdin_closes()


def append_updates(state_dir: str, name: str, key: str, count: str) -> None:
    """Append 1..COUNT to the list under KEY, one locked read-modify-write each."""
    from yoi import store
    state = _state(state_dir)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(1, int(count) + 1):
        def change(doc, i=i):
            doc.setdefault(key, []).append(i)
            return doc
        store.update(state, name, change)


def cli_config(state_dir: str, name: str, setting: str, count: str) -> None:
    """Run `yoi pod config NAME` COUNT times changing one setting (1..COUNT)."""
    from yoi.cli import main
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(1, int(count) + 1):
        if setting == "exec":
            opts = ["--exec", f"handler-{i}"]
        elif setting == "cwd":
            opts = ["--cwd", f"/srv/dir-{i}"]
        else:
            opts = ["--accept-peers" if i % 2 == 0 else "--no-accept-peers"]
        try:
            main(["pod", "config", name, "--state-dir", state_dir, *opts], prog_name="yoi")
        except SystemExit as e:
            if e.code not in (0, None):
                raise SystemExit(f"yoi pod config {' '.join(opts)} exited {e.code}")


def rewrite_forever(state_dir: str, name: str) -> None:
    """Rewrite NAME's record with a large, changing value until killed."""
    from yoi import store
    state = _state(state_dir)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        size = 20_000 + (n * 7919) % 200_000

        def change(doc, n=n, size=size):
            doc["counter"] = n
            doc["blob"] = "x" * size
            return doc
        store.update(state, name, change)


WORKERS = {
    "hold-lock": hold_lock,
    "hold-runtime-lock": hold_runtime_lock,
    "append-updates": append_updates,
    "cli-config": cli_config,
    "rewrite-forever": rewrite_forever,
}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
