"""Deeply nested or huge values in the state directory's files are "corrupt", never a
traceback: metadata.toml, a journal, a session-log line."""

from __future__ import annotations

import json

import pytest

from yoi import peers, store

DEEP_TOML = b"schema = 1\npod_name = \"a\"\nx = " + b"[" * 600 + b"]" * 600 + b"\n"
HUGE_TOML = b"schema = 1\npod_name = \"a\"\nx = " + b"7" * 5000 + b"\n"
DEEP_LINE = b'{"seq":2,"kind":"text_done","text":' + b"[" * 600 + b"]" * 600 + b"}\n"
ENTRY = (b'{"seq":1,"kind":"user_message","ts":1764590000000,"at":"2025-12-01T11:53:20Z",'
         b'"segments":[{"kind":"text","content":"kept"}]}\n')
ENTRY3 = ENTRY.replace(b'"seq":1', b'"seq":3')


def no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r


@pytest.mark.parametrize("content,why", [
    (DEEP_TOML, "nested deeper than 64 levels"),
    (HUGE_TOML, "an integer of more than 4300 digits"),
], ids=["nested-600-deep", "integer-of-5000-digits"])
def test_a_nested_metadata_file_is_corrupt_for_every_command(state, run_yoi, content, why):
    for name in ("a", "b"):
        store.create(state, name)
    path = state.metadata_path("a")
    path.write_bytes(content)
    message = f"yoi: error: {path}: does not parse: {why}"
    for args in (("pod", "show", "a"), ("pod", "start", "a"), ("pod", "send", "a", "hi"),
                 ("pod", "config", "a", "--no-exec"), ("pod", "peer", "register", "a", "b")):
        r = run_yoi(*args)
        no_traceback(r)
        assert r.exit_code == 1 and r.stderr.startswith(message), r
    r = run_yoi("pod", "list")
    no_traceback(r)
    assert r.exit_code == 0, r
    assert [line.split() for line in r.stdout.splitlines()[1:]] == [
        ["a", "-", "no", "corrupt"], ["b", "0", "no", "readable"]]
    r = run_yoi("doctor")
    no_traceback(r)
    assert r.exit_code == 1, r
    assert f"metadata-parse a: does not parse: {why}" in r.stdout, r
    assert f"never rewritten by Yoi: repair or remove it by hand ({path})" in r.stdout, r


def test_a_nested_journal_is_corrupt_and_breaks_no_command(state, run_yoi):
    for name in ("a", "b", "c"):
        store.create(state, name)
    journal = state.journal_dir / "1764590000000-4242-0badcafe.toml"
    journal.write_bytes(b'txid = "1764590000000-4242-0badcafe"\npods = ["a", "b"]\nx = '
                        + b"[" * 600 + b"]" * 600 + b"\n")
    # Every locking command reads every journal: none of them may fall over.
    r = run_yoi("pod", "peer", "register", "a", "b")
    no_traceback(r)
    assert r.exit_code == 0, r
    r = run_yoi("pod", "config", "c", "--no-accept-peers")
    assert r.exit_code == 0, r
    assert peers.is_peer(state, "a", "b")
    r = run_yoi("doctor", "--json")
    no_traceback(r)
    assert r.exit_code == 1, r
    assert [(p["code"], p["path"], p["message"]) for p in r.json["problems"]] == [
        ("journal-corrupt", str(journal),
         "journal does not parse: nested deeper than 64 levels; left in place: inspect it "
         "by hand, then delete it")]
    r = run_yoi("doctor", "--fix")
    assert r.exit_code == 1 and journal.exists(), r  # never deleted by a repair


def test_a_nested_session_line_is_skipped_kept_and_reported(state, run_yoi, started_pod):
    store.create(state, "a")
    log = state.session_path("a")
    log.write_bytes(ENTRY + DEEP_LINE + ENTRY3)
    pod = started_pod("a")  # starts: the line is skipped, and said so
    from rawsock import Raw
    with Raw(pod.socket_path) as c:
        alerts, snap = c.prelude()
    assert [a["data"]["message"] for a in alerts] == [
        f"{log}: skipped 1 line(s) that are not entries (kept in the log)"]
    assert snap["data"]["entries"] == [json.loads(ENTRY), json.loads(ENTRY3)]
    r = run_yoi("pod", "log", "a")
    no_traceback(r)
    assert r.exit_code == 0, r
    assert r.stdout == ("#1 2025-12-01T11:53:20Z user: kept\n"
                        "#3 2025-12-01T11:53:20Z user: kept\n")
    assert r.stderr == f"yoi: note: skipped 1 line(s) of {log} that are not entries\n"
    r = run_yoi("doctor", "--check", "session-unreadable")
    no_traceback(r)
    assert r.exit_code == 1, r
    assert r.stdout.splitlines()[0] == (
        "session-unreadable a: 1 line(s) are not entries (not JSON, nested too deep, or no "
        "entry): line 2; the Pod and `yoi pod log` keep and skip them. To drop them, stop the Pod and "
        f"delete those lines by hand ({log}) [error, not fixable]")
    assert log.read_bytes().startswith(ENTRY + DEEP_LINE + ENTRY3)  # kept


def test_a_torn_last_line_is_not_also_reported_unreadable(state, run_yoi):
    store.create(state, "a")
    log = state.session_path("a")
    log.write_bytes(ENTRY + DEEP_LINE)  # a whole last line that does not parse
    r = run_yoi("doctor", "--json")
    assert [p["code"] for p in r.json["problems"]] == ["session-torn"], r
    log.write_bytes(ENTRY + DEEP_LINE + ENTRY3 + b'{"seq":4,"kind":"te')
    r = run_yoi("doctor", "--json")
    assert sorted(p["code"] for p in r.json["problems"]) == [
        "session-torn", "session-unreadable"], r


@pytest.mark.parametrize("nest", [
    lambda d: "x" + ".x" * (d - 1) + " = 1",                         # dotted keys
    lambda d: "x = " + "[" * (d - 1) + "]" * (d - 1),                # arrays
    lambda d: "x = " + "{y = " * (d - 1) + "1" + "}" * (d - 1),      # inline tables
    lambda d: "[" + ".".join(["t"] * (d - 1)) + "]\ny = 1",          # table headers
    lambda d: "[[" + ".".join(["t"] * (d - 2)) + "]]\ny = 1",        # arrays of tables
], ids=["dotted-keys", "arrays", "inline-tables", "headers", "arrays-of-tables"])
def test_every_way_toml_nests_is_refused_one_level_past_the_limit(nest):
    """The nesting walk is skipped for texts with too few brackets, braces and dots to
    nest that deep: every construct that nests still gets it, exactly at the limit."""
    from yoi.parsing import MAX_DEPTH, ParseError, nested_deeper, toml_loads
    ok = toml_loads(nest(MAX_DEPTH))
    assert not nested_deeper(ok, MAX_DEPTH) and nested_deeper(ok, MAX_DEPTH - 1)
    with pytest.raises(ParseError, match=f"nested deeper than {MAX_DEPTH} levels"):
        toml_loads(nest(MAX_DEPTH + 1))


# -- files that are not files -------------------------------------------------------

def test_a_fifo_or_a_stray_file_in_the_state_directory_blocks_no_command(state, run_yoi):
    """A FIFO where a record, a log or a lock should be is never opened to wait for a
    writer; a regular file where a Pod directory should be is a corrupt Pod, not an
    error of the whole listing."""
    import os
    for name in ("a", "b", "c"):
        store.create(state, name)
    state.metadata_path("b").unlink()
    os.mkfifo(state.metadata_path("b"))
    state.session_path("c").unlink()
    os.mkfifo(state.session_path("c"))
    os.mkfifo(state.runtime_lock_path("a"))
    (state.pods_dir / "stray").write_text("junk\n")

    def run(*args):
        r = run_yoi(*args, timeout=20)
        no_traceback(r)
        return r

    r = run("pod", "list", "--json")
    assert r.exit_code == 0, r
    assert [(p["pod_name"], p["state"]) for p in r.json["pods"]] == [
        ("a", "readable"), ("b", "corrupt"), ("c", "readable"), ("stray", "corrupt")]
    r = run("pod", "show", "b")
    assert r.exit_code == 1 and "metadata.toml is not a regular file; never read" in r.stderr, r
    r = run("pod", "peer", "register", "a", "b")
    assert r.exit_code == 1 and "not a regular file" in r.stderr, r
    r = run("doctor", "--json")
    assert r.exit_code == 1, r
    assert sorted((p["code"], p["pod_name"]) for p in r.json["problems"]) == [
        ("pod-not-dir", "stray"), ("unreadable", "a"), ("unreadable", "b"),
        ("unreadable", "c")], r
    r = run("pod", "log", "c")
    assert r.exit_code == 1 and "not a regular file" in r.stderr, r
    r = run("pod", "status", "a")
    assert r.exit_code == 5, r
    r = run("pod", "start", "c")
    assert r.exit_code == 5 and "the session log is not a regular file" in r.stderr, r
    r = run("pod", "stop", "--all", "--json")
    assert r.exit_code == 0, r
    assert {p["pod_name"]: p["message"] for p in r.json["pods"]} == {
        "a": "not running", "b": "not running", "c": "not running", "stray": "not running"}
