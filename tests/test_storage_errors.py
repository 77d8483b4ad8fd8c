"""A full disk is a failure to retry (exit 1, naming the file), never a refusal.

The state directory lives on a small tmpfs that the test fills up: the
receiving Pod cannot append to its session log (ENOSPC), nor can a command
write a record.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from yoi.state import State


def _fill(path) -> None:
    """Write PATH until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 1 MiB tmpfs holding this test's state directory (YOI_HOME); every Pod of it
    is stopped and the file system unmounted afterwards."""
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        monkeypatch.setenv("YOI_HOME", str(mnt / "state"))
        yield State.resolve(mnt / "state")
    finally:
        from conftest import _stop_all_pods
        try:
            _stop_all_pods(State.resolve(mnt / "state"))
        finally:
            if subprocess.run(["umount", str(mnt)], timeout=60).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], timeout=60)


def test_a_receiver_out_of_space_is_a_failure_to_retry_not_a_refusal(small_disk, run_yoi):
    state = small_disk
    assert run_yoi("pod", "create", "t").exit_code == 0
    r = run_yoi("pod", "start", "t")
    assert r.exit_code == 0, r
    _fill(state.root.parent / "filler")

    r = run_yoi("pod", "send", "--id", "full-1", "t", "hello")
    assert r.exit_code == 1, r  # not 4: nothing was refused
    assert r.stderr == ("yoi: error: t could not record the message: not committed: No space "
                        "left on device; nothing was recorded; retry with --id full-1\n"), r
    r = run_yoi("pod", "send", "--json", "--id", "full-2", "t", "hello")
    err = json.loads(r.stdout)["error"]
    assert (r.exit_code, err["exit_code"], err["pod_error"], err["id"]) == (1, 1, "internal",
                                                                            "full-2"), r
    r = run_yoi("pod", "send", "--lines", "--id", "batch", "t", input="one\ntwo\n")
    assert r.exit_code == 1, r
    assert "t could not record batch-1: not committed: No space left on device" in r.stderr, r
    assert "not recorded: batch-1" in r.stderr and "retry with --id batch" in r.stderr, r
    assert "refused" not in r.stderr, r

    r = run_yoi("pod", "create", "b")
    assert r.exit_code == 1, r
    assert r.stderr == (f"yoi: error: cannot create Pod 'b' in {state.pods_dir}: No space "
                        "left on device (writing metadata.toml); nothing was created\n"), r
    assert not state.pod_dir("b").exists()
    before = state.metadata_path("t").read_bytes()
    r = run_yoi("pod", "config", "t", "--exec", "cat")
    assert r.exit_code == 1, r
    assert r.stderr == (f"yoi: error: cannot write {state.metadata_path('t')}: No space left "
                        "on device\n"), r
    assert state.metadata_path("t").read_bytes() == before

    os.unlink(state.root.parent / "filler")  # room again: the same id delivers, once
    r = run_yoi("pod", "send", "--id", "full-1", "t", "hello")
    assert r.exit_code == 0 and r.stdout == "delivered to t as operator (id full-1)\n", r
    r = run_yoi("pod", "send", "--id", "full-1", "t", "hello")
    assert r.exit_code == 0, r
    ids = [json.loads(line)["id"]
           for line in state.session_path("t").read_bytes().splitlines()]
    assert ids == ["full-1"]
