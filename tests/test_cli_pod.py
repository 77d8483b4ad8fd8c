"""`yoi pod create/config/list/show/rm`: output, exact exit codes and messages."""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib

import pytest

import workers
from yoi import peers, store

CREATED_AT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def one_error_line(r, message: str) -> None:
    """stderr is exactly one `yoi: error:` line with MESSAGE."""
    assert r.stderr == f"yoi: error: {message}\n", r


def failure_doc(r, code: str, exit_code: int) -> dict:
    """stdout is exactly one JSON failure document; return its error object."""
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == code, r
    assert doc["error"]["exit_code"] == exit_code == r.exit_code, r
    return doc["error"]


def record(state, name: str) -> dict:
    return tomllib.loads(state.metadata_path(name).read_text())


def make_peers(state, *pairs: str) -> None:
    for pair in pairs:
        a, b = pair.split("-")
        for n in (a, b):
            store.create(state, n, exist_ok=True)
        peers.register(state, a, b)


# -- create ---------------------------------------------------------------------

def test_create_prints_the_pod(cli, state):
    r = cli("pod", "create", "a", "--exec", "agent --stdin", "--cwd", "/w", "--no-accept-peers")
    assert r.exit_code == 0, r
    assert re.fullmatch(
        f"name:         a\ncreated_at:   {CREATED_AT}\naccept_peers: never\n"
        "exec:         agent --stdin\ncwd:          /w\n"
        r"timeout:      3600s per handler run \(default\)\nlabels:       -\npeers:        -\n",
        r.stdout), r
    assert r.stderr == ""
    doc = record(state, "a")
    assert doc["runtime"] == {"exec": "agent --stdin", "cwd": "/w"}
    assert doc["accept_peers"] == "never"


def test_create_json(cli):
    r = cli("pod", "create", "a", "--json")
    assert r.exit_code == 0, r
    doc = json.loads(r.stdout)
    assert re.fullmatch(CREATED_AT, doc["record"].pop("created_at"))
    assert doc == {"ok": True, "pod_name": "a", "created": True, "record": {
        "schema": 1, "pod_name": "a", "accept_peers": "open", "runtime": {}, "peers": []}}


def test_create_existing_is_exit_1_unless_exist_ok(cli, state):
    assert cli("pod", "create", "a", "--exec", "first").exit_code == 0
    before = state.metadata_path("a").read_bytes()
    r = cli("pod", "create", "a", "--exec", "second")
    assert r.exit_code == 1, r
    one_error_line(r, "Pod 'a' already exists")
    assert r.stdout == ""
    r = cli("pod", "create", "a", "--json")
    assert failure_doc(r, "exists", 1)["message"] == "Pod 'a' already exists"
    r = cli("pod", "create", "a", "--exist-ok", "--exec", "first")
    assert r.exit_code == 0, r
    assert r.stdout.startswith("name:         a\n"), r  # the record, as for a new Pod
    assert r.stderr == "Pod 'a' already exists\n", r
    assert "exec:         first\n" in r.stdout
    r = cli("pod", "create", "a", "--exist-ok", "--exec", "first", "--json")
    assert r.exit_code == 0 and r.json["created"] is False
    assert state.metadata_path("a").read_bytes() == before


def test_create_exist_ok_with_other_settings_fails_naming_the_difference(cli, state):
    """It used to exit 0 and keep the old handler: a job then ran the wrong one."""
    assert cli("pod", "create", "a", "--exec", "first", "--label", "job=1").exit_code == 0
    before = state.metadata_path("a").read_bytes()
    r = cli("pod", "create", "a", "--exist-ok", "--exec", "second", "--label", "job=1")
    assert r.exit_code == 1, r
    one_error_line(r, "Pod 'a' already exists with other settings (exec is 'first', not "
                      "'second'); change them with `yoi pod config a`")
    r = cli("pod", "create", "a", "--exist-ok", "--exec", "first", "--json")
    err = failure_doc(r, "exists", 1)
    assert err["differences"] == [{"setting": "labels", "stored": {"job": "1"}, "given": {}}]
    assert "labels is {job=1}, not {}" in err["message"]
    assert state.metadata_path("a").read_bytes() == before


def test_state_dir_option_beats_yoi_home(cli, yoi_home, tmp_path):
    other = tmp_path / "other"
    assert cli("pod", "create", "a", "--state-dir", other).exit_code == 0
    assert (other / "pods" / "a" / "metadata.toml").is_file()
    assert not yoi_home.exists()
    assert cli("pod", "show", "a").exit_code == 3
    assert cli("pod", "show", "a", "--state-dir", other).exit_code == 0


def test_home_dot_yoi_is_the_default(run_yoi, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "YOI_HOME": ""}
    r = run_yoi("pod", "create", "a", env=env)
    assert r.exit_code == 0, r
    assert (home / ".yoi" / "pods" / "a" / "metadata.toml").is_file()


# -- config ---------------------------------------------------------------------

def test_config_changes_settings_and_preserves_everything_else(cli, state):
    make_peers(state, "a-b")
    store.update(state, "a", lambda d: {**d, "custom": {"k": "v"},
                                        "runtime": {**d["runtime"], "pid": 42}})
    r = cli("pod", "config", "a", "--exec", "agent", "--cwd", "/w", "--no-accept-peers")
    assert r.exit_code == 0, r
    assert "exec:         agent\n" in r.stdout and "peers:        b\n" in r.stdout
    doc = record(state, "a")
    assert doc["runtime"] == {"pid": 42, "exec": "agent", "cwd": "/w"}
    assert doc["accept_peers"] == "never" and doc["custom"] == {"k": "v"}
    assert [p["pod_name"] for p in doc["peers"]] == ["b"]
    r = cli("pod", "config", "a", "--no-exec", "--accept-peers", "--json")
    assert r.exit_code == 0, r
    assert r.json["record"]["runtime"] == {"pid": 42, "cwd": "/w"}
    assert record(state, "a")["accept_peers"] == "open"


def test_handler_timeout_is_a_setting_in_the_record(cli, state):
    r = cli("pod", "create", "a", "--handler-timeout", "90")
    assert r.exit_code == 0 and "timeout:      90s per handler run\n" in r.stdout, r
    assert record(state, "a")["runtime"] == {"handler_timeout": 90.0}
    r = cli("pod", "config", "a", "--handler-timeout", "0.5", "--json")
    assert r.exit_code == 0 and r.json["record"]["runtime"] == {"handler_timeout": 0.5}, r
    for bad in ("0", "-1", "nan", "soon"):
        r = cli("pod", "config", "a", "--handler-timeout", bad)
        assert r.exit_code == 2 and "--handler-timeout" in r.stderr, r
    state.metadata_path("a").write_text(
        state.metadata_path("a").read_text().replace("0.5", "-3.0"))
    r = cli("pod", "show", "a")
    assert r.exit_code == 1 and "runtime.handler_timeout must be a number of seconds above 0 " \
        "and at most 31536000, not -3.0" in r.stderr, r


@pytest.mark.parametrize("args, message", [
    ([], "nothing to change: give --exec, --no-exec, --accept-peers, --no-accept-peers, "
         "--peer-request-ttl, --cwd, --handler-timeout, --queue-max-messages, "
         "--queue-max-bytes, --label or --unset-label"),
    (["--exec", "x", "--no-exec"], "--exec and --no-exec are mutually exclusive"),
])
def test_config_usage_errors(cli, state, args, message):
    store.create(state, "a")
    before = state.metadata_path("a").read_bytes()
    r = cli("pod", "config", "a", *args)
    assert r.exit_code == 2, r
    one_error_line(r, message)
    assert failure_doc(cli("pod", "config", "a", *args, "--json"), "usage", 2)["message"] == message
    assert state.metadata_path("a").read_bytes() == before


@pytest.mark.parametrize("command", [["config", "--exec", "x"], ["show"], ["rm"]])
def test_missing_pod_is_exit_3(cli, state, command):
    state.ensure()
    r = cli("pod", command[0], "ghost", *command[1:])
    assert r.exit_code == 3, r
    one_error_line(r, "no such Pod: ghost")
    assert r.stdout == ""
    err = failure_doc(cli("pod", command[0], "ghost", *command[1:], "--json"), "not_found", 3)
    assert err["message"] == "no such Pod: ghost"


NON_UTF8 = [  # what Python makes of the bytes b"\xff" in an argument
    (["create", "a", "--exec", "ag\udcffent"], "handler command 'ag\\udcffent'"),
    (["create", "a", "--cwd", "/w/\udcff"], "working directory '/w/\\udcff'"),
    (["config", "b", "--exec", "ag\udcffent"], "handler command 'ag\\udcffent'"),
    (["config", "b", "--cwd", "/w/\udcff"], "working directory '/w/\\udcff'"),
]


@pytest.mark.parametrize("args, what", NON_UTF8, ids=[f"{a[0]} {a[2]}" for a, _ in NON_UTF8])
def test_non_utf8_setting_is_a_usage_error_and_writes_nothing(cli, state, args, what):
    store.create(state, "b")
    before = state.metadata_path("b").read_bytes()
    r = cli("pod", *args)
    assert r.exit_code == 2, r
    one_error_line(r, f"{what} is not valid UTF-8 text")
    assert sorted(os.listdir(state.pods_dir)) == ["b"]  # no Pod, no staging directory
    assert state.metadata_path("b").read_bytes() == before


def test_non_utf8_argument_in_a_real_process(run_yoi, yoi_home):
    r = run_yoi("pod", "create", "a", "--exec", "ag\udcffent")  # argv holds b"ag\xffent"
    assert r.exit_code == 2, r
    one_error_line(r, "handler command 'ag\\udcffent' is not valid UTF-8 text")
    assert not (yoi_home / "pods" / "a").exists()


# -- list and show ----------------------------------------------------------------

@pytest.fixture
def listening(state):
    """A socket that accepts connections at Pod a's default socket path but never answers."""
    path = state.default_socket_path("a")
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(8)
        yield path
    finally:
        s.close()
        path.unlink(missing_ok=True)


def test_list_shows_peers_count_and_live_state(cli, state, started_pod):
    make_peers(state, "a-b", "a-c")
    store.create(state, "lonely")
    live = started_pod("a", create=False)
    r = cli("pod", "list")
    assert r.exit_code == 0, r
    assert r.stdout == ("NAME    PEERS  LIVE  STATE\n"
                        "a           2  yes   readable\n"
                        "b           1  no    readable\n"
                        "c           1  no    readable\n"
                        "lonely      0  no    readable\n")
    r = cli("pod", "list", "--json")
    assert r.exit_code == 0, r
    pods = {p["pod_name"]: p for p in r.json["pods"]}
    assert list(pods) == ["a", "b", "c", "lonely"]
    assert pods["a"]["live"] == {"socket_path": str(live.socket_path), "reachable": True,
                                 "status": "idle", "error": None}
    assert pods["b"]["live"]["reachable"] is False
    assert [pods[n]["peer_count"] for n in pods] == [2, 1, 1, 0]
    assert all(p["state"] == "readable" and p["error"] is None for p in pods.values())


def test_list_empty(cli, yoi_home):
    r = cli("pod", "list")
    assert (r.exit_code, r.stdout, r.stderr) == \
        (0, "", f"yoi: note: no state directory at {yoi_home}\n")
    r = cli("pod", "list", "--json")
    assert (r.exit_code, r.json) == (0, {"ok": True, "pods": []})
    assert not yoi_home.exists()  # reading creates nothing
    yoi_home.mkdir()
    r = cli("pod", "list")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "no Pods\n")


def test_list_does_not_call_a_socket_that_never_answers_live(cli, state, listening):
    store.create(state, "a")
    r = cli("pod", "list", "--json")
    assert r.exit_code == 0, r
    live = r.json["pods"][0]["live"]
    assert (live["reachable"], live["error"]) == (False, "timed out waiting for the snapshot")


def test_show(cli, state, started_pod):
    make_peers(state, "a-b")
    live = started_pod("a", create=False)
    r = cli("pod", "show", "a")
    assert r.exit_code == 0, r
    assert re.fullmatch(
        f"name:         a\ncreated_at:   {CREATED_AT}\naccept_peers: open\nexec:         -\n"
        r"cwd:          -\ntimeout:      3600s per handler run \(default\)\n"
        f"labels:       -\nsocket:       {re.escape(str(live.socket_path))}\n"
        "live:         yes\npeers:        b\n", r.stdout), r
    doc = cli("pod", "show", "b", "--json").json
    assert doc["pod_name"] == "b" and doc["record"]["peers"][0]["pod_name"] == "a"
    assert re.fullmatch(CREATED_AT, doc["record"]["peers"][0]["registered_at"])
    assert doc["live"]["reachable"] is False and doc["live"]["error"] == "no socket"


# -- rm -------------------------------------------------------------------------

def test_rm_removes_the_pod_and_its_peer_entries(cli, state):
    make_peers(state, "a-b", "b-c", "a-c")
    r = cli("pod", "rm", "b")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "removed b\n", ""), r
    assert not state.pod_dir("b").exists()
    assert [p["pod_name"] for p in record(state, "a")["peers"]] == ["c"]
    assert [p["pod_name"] for p in record(state, "c")["peers"]] == ["a"]
    r = cli("pod", "rm", "c", "--json")
    assert r.json == {"ok": True, "pod_name": "c", "removed": True,
                      "peers_updated": [{"pod_name": "a"}]}
    assert sorted(os.listdir(state.pods_dir)) == ["a"]


def test_rm_refuses_a_live_pod(cli, state):
    make_peers(state, "a-b")
    before = {n: state.metadata_path(n).read_bytes() for n in "ab"}
    live = workers.start("hold-runtime-lock", state.root, "b")
    with workers.stopping(live):
        r = cli("pod", "rm", "b")
        assert r.exit_code == 6, r
        one_error_line(r, f"Pod 'b' is running (pid {live.pid}); stop it first with "
                          "`yoi pod stop b`")
        assert failure_doc(cli("pod", "rm", "b", "--json"), "busy", 6)["pod_name"] == "b"
        assert {n: state.metadata_path(n).read_bytes() for n in "ab"} == before
    assert cli("pod", "rm", "b").exit_code == 0  # no longer live


# -- locks ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["option", "env"])
@pytest.mark.parametrize("command", [["config", "--no-accept-peers"], ["rm"],
                                     ["create", "--exist-ok"]])
def test_lock_timeout_is_exit_6_naming_the_holder(run_yoi, state, how, command):
    store.create(state, "a")
    before = state.metadata_path("a").read_bytes()
    holder = workers.start("hold-lock", state.root, "a")
    with workers.stopping(holder):
        args = ["pod", command[0], "a", *command[1:], "--json"]
        if how == "option":
            r = run_yoi(*args, "--lock-timeout", "0.3", timeout=30)
        else:
            r = run_yoi(*args, env={"YOI_LOCK_TIMEOUT": "0.3"}, timeout=30)
        assert r.exit_code == 6, r
        one_error_line(r, f"Pod 'a' is locked by pid {holder.pid} (waited 0.3s)")
        err = failure_doc(r, "busy", 6)
        assert err["holder_pid"] == holder.pid
    assert state.metadata_path("a").read_bytes() == before


def test_root_lock_timeout_applies_and_the_commands_own_wins(run_yoi, state):
    """`yoi --lock-timeout S pod ...` waits S for a Pod's lock (over $YOI_LOCK_TIMEOUT);
    the command's own --lock-timeout wins over the root's."""
    store.create(state, "a")
    before = state.metadata_path("a").read_bytes()
    holder = workers.start("hold-lock", state.root, "a")  # flock on locks/a.lock
    with workers.stopping(holder):
        r = run_yoi("--lock-timeout", "0.3", "pod", "config", "a", "--exec", "x", "--json",
                    env={"YOI_LOCK_TIMEOUT": "5"}, timeout=30)
        assert r.exit_code == 6, r
        one_error_line(r, f"Pod 'a' is locked by pid {holder.pid} (waited 0.3s)")
        assert failure_doc(r, "busy", 6)["holder_pid"] == holder.pid
        r = run_yoi("--lock-timeout", "5", "pod", "config", "a", "--exec", "x",
                    "--lock-timeout", "0.2", timeout=30)
        assert r.exit_code == 6, r
        one_error_line(r, f"Pod 'a' is locked by pid {holder.pid} (waited 0.2s)")
    assert state.metadata_path("a").read_bytes() == before


def test_bad_lock_timeout_values_are_usage_errors(cli, yoi_home):
    r = cli("pod", "list", env={"YOI_LOCK_TIMEOUT": "soon"})
    assert r.exit_code == 2, r
    one_error_line(r, "YOI_LOCK_TIMEOUT must be a number of seconds from 0 to 31536000, "
                      "not 'soon'")
    r = cli("pod", "create", "a", "--lock-timeout", "-1")
    assert r.exit_code == 2, r
    one_error_line(r, "Invalid value for '--lock-timeout': must be a number of seconds from 0 "
                      "to 31536000, not '-1' (see 'yoi pod create -h')")
    assert not yoi_home.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "31536001"])
def test_lock_timeout_out_of_range_is_one_usage_error_for_flag_and_env(cli, state, value):
    """nan would make a lock wait spin for ever (every comparison with it is false).
    The flag and the variable are read by one parser, so they refuse the same values
    with the same words."""
    store.create(state, "a")
    before = state.metadata_path("a").read_bytes()
    rule = f"must be a number of seconds from 0 to 31536000, not {value!r}"
    r = cli("pod", "config", "a", "--exec", "x", env={"YOI_LOCK_TIMEOUT": value})
    assert r.exit_code == 2, r
    one_error_line(r, f"YOI_LOCK_TIMEOUT {rule}")
    r = cli("pod", "config", "a", "--exec", "x", "--lock-timeout", value)
    assert r.exit_code == 2, r
    one_error_line(r, f"Invalid value for '--lock-timeout': {rule} (see 'yoi pod config -h')")
    assert state.metadata_path("a").read_bytes() == before


def test_a_long_lock_timeout_from_the_environment_reaches_the_detached_pod(run_yoi, state):
    """The detached Pod gets the lock timeout as a flag: the variable and the flag
    must accept the same range, or `start` fails although `list` worked."""
    assert run_yoi("pod", "create", "a").exit_code == 0
    env = {"YOI_LOCK_TIMEOUT": "1000000"}
    assert run_yoi("pod", "list", env=env).exit_code == 0
    try:
        r = run_yoi("pod", "start", "a", env=env)
        assert r.exit_code == 0, r
        assert run_yoi("pod", "status", "a").exit_code == 0
    finally:
        run_yoi("pod", "stop", "a", "--force")


# -- corrupt metadata -------------------------------------------------------------

CORRUPT = b'schema = 1\npod_name = "a"\naccept_peers = maybe\n'


@pytest.mark.parametrize("command", [["show"], ["config", "--exec", "x"], ["rm"],
                                     ["create", "--exist-ok"], ["create"]])
def test_corrupt_metadata_is_exit_1_with_path_and_position_and_left_alone(cli, state, command):
    store.create(state, "a")
    path = state.metadata_path("a")
    path.write_bytes(CORRUPT)
    message = f"{path}: does not parse: Invalid value (at line 3, column 16)"
    r = cli("pod", command[0], "a", *command[1:])
    assert r.exit_code == 1, r
    one_error_line(r, message)
    assert r.stdout == ""
    err = failure_doc(cli("pod", command[0], "a", *command[1:], "--json"), "corrupt", 1)
    assert err == {"code": "corrupt", "exit_code": 1, "message": message,
                   "path": str(path), "line": 3, "column": 16}
    assert path.read_bytes() == CORRUPT
    assert sorted(os.listdir(path.parent)) == ["metadata.toml", "session.jsonl"]


def test_list_reports_a_corrupt_pod_and_goes_on(cli, state):
    store.create(state, "a")
    store.create(state, "b")
    state.metadata_path("a").write_bytes(CORRUPT)
    r = cli("pod", "list")
    assert r.exit_code == 0, r
    assert r.stdout == ("NAME  PEERS  LIVE  STATE\n"
                        "a         -  no    corrupt\n"
                        "b         0  no    readable\n")
    a = cli("pod", "list", "--json").json["pods"][0]
    assert a["state"] == "corrupt" and a["peer_count"] is None
    assert a["error"] == (f"{state.metadata_path('a')}: does not parse: "
                          "Invalid value (at line 3, column 16)")
    assert state.metadata_path("a").read_bytes() == CORRUPT


def test_list_read_in_worker_processes_is_the_same(cli, state, started_pod, monkeypatch):
    """At scale the records are read in worker processes, which send back only what
    the listing shows: the same listing, corrupt and live Pods, labels and all."""
    make_peers(state, "a-b", "a-c")
    store.create(state, "d", labels={"job": "7"})
    state.metadata_path("c").write_bytes(CORRUPT)
    started_pod("a", create=False)
    runs = {}
    for threshold in (10**9, 1):
        monkeypatch.setattr(store, "LIST_POOL_THRESHOLD", threshold)
        runs[threshold] = [cli("pod", "list", *args).stdout
                           for args in ((), ("--json",), ("--label", "job=7", "--json"))]
    assert runs[1] == runs[10**9]
    assert [p["pod_name"] for p in json.loads(runs[1][2])["pods"]] == ["d"]
    pods = json.loads(runs[1][1])["pods"]
    assert [(p["peer_count"], p["state"], p["live"]["reachable"]) for p in pods] == [
        (2, "readable", True), (1, "readable", False), (None, "corrupt", False),
        (0, "readable", False)]
    assert "does not parse" in pods[2]["error"]


def test_symlinked_pod_dir_is_refused(cli, state, tmp_path):
    store.create(state, "a")
    outside = tmp_path / "outside"
    state.pod_dir("a").rename(outside)
    state.pod_dir("a").symlink_to(outside)
    before = (outside / "metadata.toml").read_bytes()
    for command in (["config", "--no-accept-peers"], ["rm"], ["show"]):
        r = cli("pod", command[0], "a", *command[1:])
        assert r.exit_code == 1, r
        one_error_line(r, f"Pod directory {state.pod_dir('a')} is a symlink; refusing to follow it")
    assert (outside / "metadata.toml").read_bytes() == before


# -- Click's own usage errors follow the house format ------------------------------

@pytest.mark.parametrize("args, message", [
    (["pod", "create", "a", "--bogus"], "no such option '--bogus' for yoi pod create (see 'yoi pod create -h')"),
    (["pod", "create"], "Missing argument 'NAME' (see 'yoi pod create -h')"),
    (["pod", "nope"], "no such command 'nope' in yoi pod (see 'yoi pod -h')"),
    (["--bogus"], "no such option '--bogus' for yoi (see 'yoi -h')"),
    (["pod", "show", "a", "b"], "Got unexpected extra argument (b) (see 'yoi pod show -h')"),
])
def test_click_usage_errors_are_one_line_exit_2(cli, yoi_home, args, message):
    r = cli(*args)
    assert r.exit_code == 2, r
    one_error_line(r, message)
    r = cli(*args, "--json")
    assert failure_doc(r, "usage", 2)["message"] == message
    assert not yoi_home.exists()


def test_every_error_is_one_stderr_line_in_a_real_process(run_yoi, state):
    store.create(state, "a")
    for args, code in ((["pod", "create", "a"], 1), (["pod", "show", "b"], 3),
                       (["pod", "create", ".."], 2), (["pod", "frob"], 2)):
        r = run_yoi(*args, "--json")
        assert r.exit_code == code, r
        assert r.stderr.startswith("yoi: error: ") and r.stderr.count("\n") == 1, r
        assert json.loads(r.stdout)["ok"] is False


def test_rm_is_not_fooled_by_commands_that_only_look(cli, state):
    """status/list/doctor hold a stopped Pod's runtime lock for an instant: rm waits that out."""
    import subprocess
    import sys
    names = [f"p{i}" for i in range(20)]
    for n in names:
        store.create(state, n)
    looker = ("import sys, time\n"
              "from yoi.lock import is_locked\n"
              "paths = sys.argv[1:]\n"
              "end = time.monotonic() + 30\n"
              "print('go', flush=True)\n"
              "while time.monotonic() < end:\n"
              "    for p in paths:\n"
              "        is_locked(p)\n")
    paths = [str(state.runtime_lock_path(n)) for n in names]
    for p in paths:
        open(p, "a").close()
    lookers = [subprocess.Popen([sys.executable, "-c", looker, *paths], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    try:
        for proc in lookers:
            assert proc.stdout.readline() == "go\n"
        results = [cli("pod", "rm", n) for n in names]
    finally:
        for proc in lookers:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert [r.exit_code for r in results] == [0] * len(names), results
