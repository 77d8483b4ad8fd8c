"""`yoi pod send`: the checks (made before anything is sent, or by a live Pod of ours
itself and then explained from the records), and their exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fake_pods
from fake_pods import fake  # noqa: F401  (fixture)
from yoi import peers, protocol, store


@pytest.fixture
def pair(state, fake):
    """Pods A and B, peers, with a correct fake serving B."""
    store.create(state, "A")
    pod = fake(fake_pods.good, "B")
    peers.register(state, "A", "B")
    return pod


def fails(r, code: int, message: str) -> None:
    assert r.exit_code == code, r
    assert r.stdout == "", r
    assert r.stderr == f"yoi: error: {message}\n", r


@pytest.mark.parametrize("args, message", [
    (["../x", "hi"], "invalid target Pod name '../x'"),
    (["--from", "a/b", "B", "hi"], "invalid source Pod name 'a/b'"),
    (["B", ""], "empty message: nothing to send"),
    (["B", "  \n\t"], "empty message: nothing to send"),
    (["--id", "has space", "B", "hi"], "invalid --id 'has space'"),
    (["--id", "x" * 129, "B", "hi"], "invalid --id"),
    (["B"], "missing MESSAGE (give - to read it from stdin)"),
])
def test_usage_errors_exit_2_and_send_nothing(cli, pair, args, message):
    r = cli("pod", "send", *args)
    assert r.exit_code == 2, r
    assert r.stderr.startswith(f"yoi: error: {message}"), r
    assert pair.connections == 0


def test_usage_is_checked_before_existence(cli, state):
    r = cli("pod", "send", "nosuch", "")
    assert r.exit_code == 2, r


def test_empty_stdin_message(cli, pair):
    fails(cli("pod", "send", "B", "-", input="\n"), 2, "empty message: nothing to send")
    assert pair.connections == 0


def test_message_over_the_protocol_limit(cli, pair):
    r = cli("pod", "send", "B", "-", input="x" * protocol.MAX_METHOD_LINE)
    assert r.exit_code == 2, r
    assert "message too long" in r.stderr
    assert "protocol limit of 1048576 bytes (1 MiB)" in r.stderr
    assert pair.connections == 0


def test_escaping_counts_towards_the_limit(cli, pair):
    # 600 KiB of quotes is 1.2 MiB once JSON-escaped.
    r = cli("pod", "send", "B", "-", input='"' * (600 << 10))
    assert r.exit_code == 2, r
    assert "message too long" in r.stderr


def test_a_large_message_under_the_limit_is_delivered(cli, pair):
    body = "z" * (900 << 10)
    r = cli("pod", "send", "--id", "big-1", "B", "-", input=body)
    assert r.exit_code == 0, r
    assert pair.methods == [("notify", {"message": body, "id": "big-1", "ack": "compact"})]


def test_invalid_utf8_on_stdin(cli, pair):
    r = cli("pod", "send", "B", "-", input=b"caf\xe9\n")
    assert r.exit_code == 2, r
    assert "not valid UTF-8" in r.stderr


def test_unknown_target_exits_3(cli, state):
    fails(cli("pod", "send", "nosuch", "hi"), 3,
          f"no such Pod: nosuch (no state directory at {state.root})")
    state.ensure()
    fails(cli("pod", "send", "nosuch", "hi"), 3, "no such Pod: nosuch")


def test_unknown_source_exits_3(cli, state):
    store.create(state, "B")
    fails(cli("pod", "send", "--from", "ghost", "B", "hi"), 3,
          "no such Pod: ghost (the source)")


def test_not_a_peer_exits_4_and_nothing_is_committed(cli, state, started_pod):
    """A live Pod of ours refuses the message itself; the records then explain it."""
    store.create(state, "C")
    pod = started_pod("B")
    fails(cli("pod", "send", "--from", "C", "B", "hi"), 4,
          "not a peer: C does not list B as a peer "
          "(introduce them with `yoi pod peer register C B`)")
    fails(cli("pod", "send", "--from", "ghost", "B", "hi"), 3, "no such Pod: ghost (the source)")
    store.create(state, "D", accept_peers="ask")  # a pending request is named as such
    assert peers.register(state, "C", "D")["state"] == "pending"
    started_pod("D", create=False)
    r = cli("pod", "send", "--from", "C", "D", "hi")
    assert r.exit_code == 4 and r.stderr.startswith("yoi: error: not a peer yet: "), r
    assert state.session_path("B").read_bytes() == state.session_path("D").read_bytes() == b""
    assert pod.socket_path


def test_yoi_pod_not_a_peer_exits_4(cli, state, started_pod, monkeypatch):
    store.create(state, "C")
    started_pod("B")
    monkeypatch.setenv("YOI_POD", "C")
    r = cli("pod", "send", "B", "hi")
    assert r.exit_code == 4, r
    assert state.session_path("B").read_bytes() == b""


def test_a_pod_that_does_not_check_is_not_sent_what_the_records_refuse(cli, state, fake):
    """A Pod that does not announce "source" (the original's) does not check the
    relation: the client checks the records before it writes anything."""
    store.create(state, "A")
    store.create(state, "C")
    pod = fake(fake_pods.original, "B")
    fails(cli("pod", "send", "--from", "C", "B", "hi"), 4,
          "not a peer: C does not list B as a peer "
          "(introduce them with `yoi pod peer register C B`)")
    fails(cli("pod", "send", "--from", "ghost", "B", "hi"), 3, "no such Pod: ghost (the source)")
    assert pod.methods == []
    peers.register(state, "A", "B")
    r = cli("pod", "send", "--from", "A", "--id", "o-1", "B", "hi")
    assert r.exit_code == 0, r
    assert pod.methods == [("notify", {"message": "[Peer message from `A`]\nhi", "id": "o-1"})]


def test_sending_to_yourself_is_refused_without_suggesting_a_self_peer(cli, pair):
    r = cli("pod", "send", "--from", "B", "B", "hi")
    assert r.exit_code == 4, r
    assert r.stderr == ("yoi: error: B cannot send itself a peer message; to notify it as the "
                        "operator, send without --from and with YOI_POD unset "
                        "(`yoi pod send --from '' B ...`)\n")
    assert "peer register" not in r.stderr
    assert pair.connections == 0


def test_stopped_peer_exits_5_and_is_not_started(cli, state):
    store.create(state, "A")
    store.create(state, "B")
    peers.register(state, "A", "B")
    fails(cli("pod", "send", "--from", "A", "B", "hi"), 5,
          "B is not running; start it with `yoi pod restore B`")
    assert not state.default_socket_path("B").exists()


def test_json_failure_document(cli, state):
    state.ensure()
    r = cli("pod", "send", "--json", "nosuch", "hi")
    assert r.exit_code == 3
    assert r.json == {"ok": False, "error": {"code": "not_found", "exit_code": 3,
                                             "message": "no such Pod: nosuch",
                                             "pod_name": "nosuch"}}


def test_timeout_must_be_positive(cli, pair):
    r = cli("pod", "send", "--timeout", "0", "B", "hi")
    assert r.exit_code == 2


def test_help_has_examples(cli):
    r = cli("pod", "send", "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.stdout and "yoi pod send --from coder reviewer" in r.stdout


def test_real_subprocess_end_to_end(run_yoi, pair, state):
    """From the installed command line, as CI calls it."""
    r = run_yoi("pod", "send", "--from", "A", "--id", "sub-1", "B", "from a subprocess")
    assert r.exit_code == 0, r
    assert r.stdout == "delivered to B (id sub-1)\n"
    r = run_yoi("pod", "send", "--from", "A", "B", "-", input="from stdin\n")
    assert r.exit_code == 0, r
    assert [p["message"] for _, p in pair.methods] == ["from a subprocess", "from stdin"]
    assert all(p["source"] == "A" for _, p in pair.methods)


def test_limit_boundary_is_the_pods_line_limit():
    from yoi.delivery import encode
    from yoi.errors import UsageError
    overhead = len(encode("x", "id-1", "A")) - 2  # minus the message and the newline
    exact = "x" * (protocol.MAX_METHOD_LINE - overhead)
    assert len(encode(exact, "id-1", "A")) == protocol.MAX_METHOD_LINE + 1
    with pytest.raises(UsageError, match="1048577-byte notify line"):
        encode(exact + "x", "id-1", "A")


def test_one_shot_send_keeps_its_imports_lean(pair, state):
    """CI calls this hundreds of times: modules it does not need stay unimported."""
    heavy = ("socket", "selectors", "secrets", "shutil", "tempfile", "hashlib",
             "subprocess", "asyncio")
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
            "sys.argv = ['yoi', 'pod', 'send', '--id', 'imp-1', 'B', 'hi']\n"
            "from yoi.cli import main\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "delivered to B as operator (id imp-1)\n[]\n"
    assert pair.notified_ids() == ["imp-1"]
