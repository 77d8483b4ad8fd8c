"""Helpers shared by the benchmark cases and the soaks."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def yoi_argv() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m yoi``."""
    script = Path(sys.executable).parent / "yoi"
    if script.exists():
        return [str(script)]
    found = shutil.which("yoi")
    return [found] if found else [sys.executable, "-m", "yoi"]


def run(argv, env=None, input=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=env, input=input, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {p.returncode}:\n"
                           f"{p.stdout}\n{p.stderr}")
    return p


def yoi(*args, env=None, input=None, check=True, timeout=120):
    return run(yoi_argv() + [str(a) for a in args], env=env, input=input, check=check,
               timeout=timeout)


def timed(argv, env=None, input=None) -> float:
    t0 = time.perf_counter()
    run(argv, env=env, input=input)
    return time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


@contextmanager
def state_dir(prefix="yoi-bench-"):
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def env_for(state: Path, **extra) -> dict:
    env = dict(os.environ)
    env["YOI_HOME"] = str(state)
    env.pop("YOI_FAULT", None)
    # Measure the product as installed: pip compiles bytecode at install time,
    # so let an editable checkout cache it too instead of recompiling each run.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write_pods(state: Path, names, peers_of) -> None:
    """Write metadata files directly (fast set-up for scale cases)."""
    import tomli_w
    from yoi.metadata import new_record, utcnow
    now = utcnow()
    for d in ("pods", "locks", "journal"):
        (state / d).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    for name in names:
        doc = new_record(name)
        doc["peers"] = [{"pod_name": p, "registered_at": now} for p in peers_of(name)]
        pod = state / "pods" / name
        pod.mkdir(mode=0o700)
        (pod / "metadata.toml").write_bytes(tomli_w.dumps(doc).encode())
        os.chmod(pod / "metadata.toml", 0o600)
        (pod / "session.jsonl").touch(mode=0o600)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def write_log(path, entries: int) -> None:
    """A session log of ENTRIES notifications of 100 bytes, as a Pod writes them."""
    from yoi.session import Entry
    with open(path, "wb") as f:
        for i in range(1, entries + 1):
            mid = f"prefill-{i}"
            f.write(Entry("system_item", {"item": {
                "kind": "notification", "message": "x" * 100, "body": "x" * 100, "id": mid,
                "at": "2026-11-27T10:00:00Z"}}, mid, at="2026-11-27T10:00:00Z").line(i))
