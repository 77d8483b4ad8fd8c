"""The metadata store: state directory, atomic TOML records, locks, corrupt files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib

import pytest

import workers
from yoi import metadata, store
from yoi.errors import AlreadyExists, Busy, CorruptMetadata, Failed, NotFound, UsageError
from yoi.lock import FileLock, is_locked
from yoi.state import State


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def write_record(state: State, name: str, text: str) -> bytes:
    """Put TEXT in place as NAME's metadata.toml (the Pod dir is created)."""
    path = state.metadata_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path.read_bytes()


# -- resolution and layout ------------------------------------------------------

def test_state_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("YOI_HOME", str(tmp_path / "env"))
    assert State.resolve(tmp_path / "opt").root == tmp_path / "opt"
    assert State.resolve().root == tmp_path / "env"
    monkeypatch.delenv("YOI_HOME")
    assert State.resolve().root == tmp_path / "home" / ".yoi"
    assert not any(tmp_path.iterdir())  # resolving creates nothing


def test_lock_timeout_default_env_and_explicit(monkeypatch, tmp_path):
    assert State.resolve(tmp_path).lock_timeout == 10.0
    monkeypatch.setenv("YOI_LOCK_TIMEOUT", "2.5")
    assert State.resolve(tmp_path).lock_timeout == 2.5
    assert State.resolve(tmp_path, 0.25).lock_timeout == 0.25
    for bad in ("soon", "-1", "nan", "inf", "-inf", "1e400"):
        monkeypatch.setenv("YOI_LOCK_TIMEOUT", bad)
        with pytest.raises(UsageError):
            State.resolve(tmp_path)


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_directories_0700_and_files_0600(state, umask):
    old = os.umask(umask)
    try:
        store.create(state, "a")
        store.configure(state, "a", exec_cmd="agent")
    finally:
        os.umask(old)
    for d in (state.root, state.pods_dir, state.locks_dir, state.journal_dir, state.pod_dir("a")):
        assert mode(d) == 0o700, d
    for f in (state.metadata_path("a"), state.session_path("a"), state.lock_path("a")):
        assert mode(f) == 0o600, f


def test_state_dir_may_be_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    state = State.resolve(link)
    store.create(state, "a")
    store.configure(state, "a", accept_peers=False)
    assert link.is_symlink()
    assert (real / "pods" / "a" / "metadata.toml").is_file()
    assert store.read(state, "a")["accept_peers"] == "never"


def test_pod_dir_symlink_is_refused_and_target_untouched(state, tmp_path):
    store.create(state, "a")
    outside = tmp_path / "outside"
    state.pod_dir("a").rename(outside)
    state.pod_dir("a").symlink_to(outside)
    before = (outside / "metadata.toml").read_bytes()
    for call in (lambda: store.read(state, "a"),
                 lambda: store.create(state, "a", exist_ok=True),
                 lambda: store.configure(state, "a", accept_peers=False),
                 lambda: store.update(state, "a", lambda d: {**d, "x": 1}),
                 lambda: store.remove(state, "a")):
        with pytest.raises(Failed, match=r"Pod directory .*/pods/a is a symlink; refusing to follow it"):
            call()
    assert (outside / "metadata.toml").read_bytes() == before
    assert sorted(os.listdir(outside)) == ["metadata.toml", "session.jsonl"]
    assert state.pod_dir("a").is_symlink()


def test_dangling_pod_dir_symlink_is_refused_by_create(state, tmp_path):
    state.ensure()
    state.pod_dir("a").symlink_to(tmp_path / "nowhere")
    with pytest.raises(Failed, match="is a symlink"):
        store.create(state, "a")
    assert not (tmp_path / "nowhere").exists()


def test_metadata_symlink_is_refused_and_target_untouched(state, tmp_path):
    store.create(state, "a")
    target = tmp_path / "elsewhere.toml"
    target.write_bytes(state.metadata_path("a").read_bytes())
    state.metadata_path("a").unlink()
    state.metadata_path("a").symlink_to(target)
    before = target.read_bytes()
    for call in (lambda: store.read(state, "a"),
                 lambda: store.configure(state, "a", exec_cmd="x"),
                 lambda: store.remove(state, "a")):
        with pytest.raises(CorruptMetadata, match=r"metadata.toml is a symlink; refusing to follow it"):
            call()
    assert target.read_bytes() == before
    assert state.metadata_path("a").is_symlink()


# -- records --------------------------------------------------------------------

def test_create_writes_a_schema_1_record_and_empty_session(state, tmp_path):
    record, created = store.create(state, "a", exec_cmd="agent --stdin", cwd="rel",
                                   accept_peers=False)
    assert created
    on_disk = tomllib.loads(state.metadata_path("a").read_text())
    assert on_disk == record
    assert on_disk["schema"] == 1 and on_disk["pod_name"] == "a"
    assert on_disk["accept_peers"] == "never"
    assert on_disk["runtime"] == {"exec": "agent --stdin", "cwd": os.path.abspath("rel")}
    assert on_disk["peers"] == []
    assert state.session_path("a").read_bytes() == b""


def test_create_existing_pod(state):
    first, _ = store.create(state, "a")
    with pytest.raises(AlreadyExists, match="Pod 'a' already exists"):
        store.create(state, "a", exec_cmd="other")
    with pytest.raises(AlreadyExists, match="already exists with other settings"):
        store.create(state, "a", exec_cmd="other", exist_ok=True)
    again, created = store.create(state, "a", exist_ok=True)
    assert (again, created) == (first, False)


UNKNOWN = """
future_flag = "kept"

[runtime]
exec = "old"
socket_path = "/run/a.sock"
pid = 4242
future_runtime_key = [1, 2, 3]

[extension]
note = "a table this version does not know"

[[peers]]
pod_name = "b"
registered_at = 2026-11-27T10:05:00Z
trust = "high"
"""


def test_unknown_keys_survive_every_rewrite(state):
    store.create(state, "a")
    store.create(state, "b")
    store.update(state, "a", lambda d: {**d, **tomllib.loads(UNKNOWN)})
    store.configure(state, "a", exec_cmd="new", accept_peers=False, cwd="/w")
    store.update(state, "a", lambda d: {**d, "later": 1})
    doc = tomllib.loads(state.metadata_path("a").read_text())
    expected = tomllib.loads(UNKNOWN)
    assert doc["future_flag"] == "kept"
    assert doc["extension"] == expected["extension"]
    assert doc["peers"] == expected["peers"]
    assert doc["runtime"] == {**expected["runtime"], "exec": "new", "cwd": "/w"}
    assert doc["accept_peers"] == "never" and doc["later"] == 1


def test_configure_no_exec_removes_only_the_handler(state):
    store.create(state, "a", exec_cmd="agent", cwd="/w")
    doc = store.configure(state, "a", exec_cmd=None)
    assert doc["runtime"] == {"cwd": "/w"}
    assert store.read(state, "a")["runtime"] == {"cwd": "/w"}


def test_missing_pod_is_not_found(state):
    with pytest.raises(NotFound, match="no such Pod: ghost"):
        store.read(state, "ghost")
    with pytest.raises(NotFound, match="no such Pod: ghost"):
        store.configure(state, "ghost", accept_peers=True)
    with pytest.raises(NotFound, match="no such Pod: ghost"):
        store.remove(state, "ghost")


def test_remove_drops_the_pod_from_every_peer_and_keeps_other_relations(state):
    from yoi import peers
    for n in "abcd":
        store.create(state, n)
    peers.register(state, "a", "b")
    peers.register(state, "c", "b")
    peers.register(state, "a", "c")
    store.update(state, "a", lambda d: {**d, "extra": "kept"})
    result = store.remove(state, "b")
    assert result == {"pod_name": "b", "removed": True,
                      "peers_updated": [{"pod_name": "a"}, {"pod_name": "c"}]}
    assert not state.pod_dir("b").exists()
    assert metadata.peer_names(store.read(state, "a")) == ["c"]
    assert metadata.peer_names(store.read(state, "c")) == ["a"]
    assert store.read(state, "a")["extra"] == "kept"
    assert [p.name for p in store.list_all(state)] == ["a", "c", "d"]
    assert os.listdir(state.journal_dir) == []
    assert not [e for e in os.listdir(state.pods_dir) if e.startswith(".")]


def test_remove_with_a_dangling_peer_entry(state):
    store.create(state, "a")
    store.update(state, "a", lambda d: {**d, "peers": [{"pod_name": "gone"}]})
    assert store.remove(state, "a") == {"pod_name": "a", "removed": True, "peers_updated": []}
    assert not state.pod_dir("a").exists()


def test_create_that_fails_midway_leaves_no_staging_directory(state, monkeypatch):
    """Whatever stops a create after its staging directory exists removes it again."""
    def broken_dumps(doc):
        raise RuntimeError("cannot serialise")
    monkeypatch.setattr(metadata, "dumps", broken_dumps)
    with pytest.raises(RuntimeError, match="cannot serialise"):
        store.create(state, "a")
    assert os.listdir(state.pods_dir) == []


def test_create_after_remove_starts_fresh(state):
    store.create(state, "a", exec_cmd="first")
    store.remove(state, "a")
    record, created = store.create(state, "a")
    assert created and record["runtime"] == {}


# -- corrupt records -------------------------------------------------------------

CORRUPT_TEXTS = {
    "syntax": ('schema = 1\npod_name = "a"\naccept_peers = maybe\n',
               r"does not parse: Invalid value \(at line 3, column 16\)"),
    "schema-2": ('schema = 2\npod_name = "a"\n', r"unsupported schema 2 \(expected 1\)"),
    "no-schema": ('pod_name = "a"\n', r"unsupported schema None \(expected 1\)"),
    "no-name": ("schema = 1\n", r"pod_name None is missing or not a valid Pod name"),
    "wrong-name": ('schema = 1\npod_name = "b"\n',
                   r"pod_name 'b' does not match its directory 'a'"),
    "accept-peers": ('schema = 1\npod_name = "a"\naccept_peers = "yes"\n',
                     r"accept_peers must be \"open\", \"ask\" or \"never\" \(or true/false\), "
                     r"not 'yes'"),
    "runtime": ('schema = 1\npod_name = "a"\nruntime = 3\n', r"runtime must be a table"),
    "peers": ('schema = 1\npod_name = "a"\npeers = "b"\n', r"peers must be an array of tables"),
    "peer-name": ('schema = 1\npod_name = "a"\n[[peers]]\npod_name = "../x"\n',
                  r"peers\[0\] has no valid pod_name"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_TEXTS))
def test_corrupt_record_is_reported_with_its_path_and_never_overwritten(state, kind):
    text, problem = CORRUPT_TEXTS[kind]
    store.create(state, "b")
    before = write_record(state, "a", text)
    path = str(state.metadata_path("a"))
    for call in (lambda: store.read(state, "a"),
                 lambda: store.create(state, "a", exist_ok=True),
                 lambda: store.configure(state, "a", accept_peers=False),
                 lambda: store.update(state, "a", lambda d: d),
                 lambda: store.remove(state, "a")):
        with pytest.raises(CorruptMetadata, match=problem) as e:
            call()
        assert e.value.message.startswith(f"{path}: ")
        assert e.value.details["path"] == path
        assert state.metadata_path("a").read_bytes() == before
    [listed] = [p for p in store.list_all(state) if p.name == "a"]
    assert listed.state == "corrupt" and listed.doc is None


def test_parse_error_carries_line_and_column(state):
    write_record(state, "a", 'schema = 1\npod_name = "a"\n[runtime\n')
    with pytest.raises(CorruptMetadata) as e:
        store.read(state, "a")
    assert (e.value.details["line"], e.value.details["column"]) == (3, 9)
    assert "(at line 3, column 9)" in e.value.message


def test_non_utf8_record_is_located(state):
    path = state.metadata_path("a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b'schema = 1\npod_name = "a"\n# caf\xe9\n')
    with pytest.raises(CorruptMetadata, match=r"not UTF-8 \(at line 3, column 6\)") as e:
        store.read(state, "a")
    assert (e.value.details["line"], e.value.details["column"]) == (3, 6)


def test_pod_dir_without_metadata_is_corrupt_not_missing(state):
    state.pod_dir("a").mkdir(parents=True)
    with pytest.raises(CorruptMetadata, match="metadata.toml: missing"):
        store.create(state, "a")
    assert os.listdir(state.pod_dir("a")) == []


def test_corrupt_peer_blocks_removal_and_changes_nothing(state):
    from yoi import peers
    for n in "ab":
        store.create(state, n)
    peers.register(state, "a", "b")
    a_before = state.metadata_path("a").read_bytes()
    b_path = state.metadata_path("b")
    b_path.write_bytes(b_path.read_bytes() + b"\n[[[broken\n")
    b_before = b_path.read_bytes()
    with pytest.raises(CorruptMetadata, match=str(b_path)):
        store.remove(state, "a")
    assert state.metadata_path("a").read_bytes() == a_before
    assert b_path.read_bytes() == b_before
    assert os.listdir(state.journal_dir) == []


# -- locks ----------------------------------------------------------------------

def test_lock_timeout_names_the_holder_pid(state):
    store.create(state, "a")
    holder = workers.start("hold-lock", state.root, "a")
    with workers.stopping(holder):
        assert is_locked(state.lock_path("a")) is True
        slow = State.resolve(state.root, lock_timeout=0.2)
        with pytest.raises(Busy) as e:
            store.configure(slow, "a", accept_peers=False)
        assert e.value.message == f"Pod 'a' is locked by pid {holder.pid} (waited 0.2s)"
        assert e.value.details == {"holder_pid": holder.pid}
        assert e.value.exit_code == 6
    # SIGKILL released the lock: the next writer gets it at once.
    store.configure(State.resolve(state.root, lock_timeout=0), "a", accept_peers=False)
    assert store.read(state, "a")["accept_peers"] == "never"
    assert is_locked(state.lock_path("a")) is False


def test_waiter_gets_the_lock_when_the_holder_releases(state):
    store.create(state, "a")
    holder = workers.start("hold-lock", state.root, "a")
    with workers.stopping(holder):
        holder.stdin.close()  # the holder releases and exits
        with FileLock(state.lock_path("a"), timeout=30):
            pass
    assert is_locked(state.lock_path("a")) is False


LOCK_WITHOUT_ROOM = """
import resource, sys
from pathlib import Path
from yoi.lock import FileLock, is_locked
path = Path(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # the pid cannot be written
try:
    FileLock(path, 0).acquire().release()
    print("acquired")
except OSError as e:
    print("raised", e.strerror)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("held" if is_locked(path) else "free")
"""


def test_lock_whose_pid_cannot_be_written_is_still_taken_and_released(state):
    """A full disk must not leave a lock held by a descriptor nobody can release."""
    state.ensure()
    p = subprocess.run([sys.executable, "-c", LOCK_WITHOUT_ROOM, str(state.lock_path("a"))],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, "acquired\nfree\n", "")


def test_symlinked_locks_directory_is_refused(cli, state, tmp_path):
    """Only the state directory itself may be a symlink; locks/ is never followed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state.root.mkdir(mode=0o700)
    (state.root / "locks").symlink_to(elsewhere)
    r = cli("pod", "create", "a")
    assert r.exit_code == 1, r
    assert "is a symlink; refusing to follow it" in r.stderr
    assert list(elsewhere.iterdir()) == []


def test_runtime_hint_of_the_wrong_type_is_corrupt_metadata_not_a_crash(cli, state):
    from yoi import store
    store.create(state, "a")
    store.update(state, "a", lambda d: d | {"runtime": {"socket_path": 42}})
    r = cli("pod", "list", "--json")
    assert r.exit_code == 0, r
    (item,) = r.json["pods"]
    assert item["state"] == "corrupt"
    assert "runtime.socket_path must be a string, not 42" in item["error"]
    r = cli("pod", "show", "a")
    assert r.exit_code == 1 and "runtime.socket_path must be a string" in r.stderr, r


def test_journal_temp_file_with_an_impossible_pid_does_not_crash_commands(cli, state):
    from yoi import store
    store.create(state, "a")
    junk = state.journal_dir / ".1-99999999999999999999-ab.toml.tmp-x"
    junk.write_text("")
    r = cli("pod", "config", "a", "--no-accept-peers")
    assert r.exit_code == 0, r
    assert not junk.exists()  # no process can have that pid: the writer is gone


def test_empty_state_dir_option_is_a_usage_error(cli, yoi_home):
    r = cli("pod", "create", "a", "--state-dir", "")
    assert (r.exit_code, r.stderr) == (2, "yoi: error: --state-dir must not be empty\n"), r
    assert not yoi_home.exists()


def test_closed_stdout_pipe_ends_quietly(state, yoi_home):
    import subprocess
    import sys
    from yoi import store
    store.create(state, "a")
    # `true` exits without reading: the write meets a closed pipe.
    p = subprocess.run(f"{sys.executable} -m yoi pod list --json | true; "
                       "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, timeout=60)
    assert p.stderr == "", p.stderr
    assert p.stdout.strip() == "141", p.stdout


def test_reading_every_record_pauses_the_cycle_collector_and_restores_it(state, monkeypatch):
    """Records hold no reference cycles: listing many parses them with the cyclic
    collector paused, and leaves it as it found it, also when a read fails."""
    import gc
    from yoi.parsing import paused_gc
    for n in "abc":
        store.create(state, n)
    seen = []
    real = store.read_pod_file

    def read(st, name):
        seen.append(gc.isenabled())
        return real(st, name)

    monkeypatch.setattr(store, "read_pod_file", read)
    assert [p.name for p in store.list_all(state)] == ["a", "b", "c"]
    assert seen == [False] * 3 and gc.isenabled()
    with pytest.raises(RuntimeError):
        with paused_gc():
            raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_library_refuses_a_handler_timeout_out_of_range_before_writing(state):
    """Not only the CLI's option type: a record the next read would call corrupt is
    never written."""
    for bad in (0, -1, float("nan"), 1e12, True, "5"):
        with pytest.raises(UsageError, match="the handler timeout must be a number of "
                                             "seconds above 0 and at most 31536000"):
            store.create(state, "h", handler_timeout=bad)
        assert not state.pod_dir("h").exists()
    store.create(state, "h", handler_timeout=30)
    before = state.metadata_path("h").read_bytes()
    with pytest.raises(UsageError):
        store.configure(state, "h", handler_timeout=0)
    assert state.metadata_path("h").read_bytes() == before
    assert store.read(state, "h")["runtime"]["handler_timeout"] == 30
