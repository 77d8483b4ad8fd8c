"""`yoi doctor` on each damaged shape of a family: it finds exactly that, and --fix
repairs only what has one right repair."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from test_doctor import check_found_and_fixed, doctor, meta_path, only, read_doc, write_doc
from yoi import children, metadata, store
from yoi.atomic import atomic_write
from yoi.lock import FileLock


@pytest.fixture
def family(state):
    """lead -> kid, both consistent."""
    store.create(state, "lead")
    children.create_child(state, "lead", "kid")
    return state


def edit(state, name, fn) -> None:
    doc = read_doc(state, name)
    fn(doc)
    write_doc(state, name, doc)


def test_a_consistent_family_is_clean(cli, family):
    children.create_child(family, "kid", "grand", scope="peers")
    r, problems = doctor(cli)
    assert (r.exit_code, problems) == (0, []), r


def test_an_orphan_is_reported_and_not_touched(cli, family):
    shutil.rmtree(family.pod_dir("lead"))
    before = meta_path(family, "kid").read_bytes()
    p = check_found_and_fixed(cli, "child-orphan", "kid", meta_path(family, "kid"),
                              fixable=False)
    assert p["message"] == ("names 'lead' as its parent, but there is no Pod 'lead'; remove it "
                            "with `yoi pod rm kid` (`--recursive` with its children)")
    assert meta_path(family, "kid").read_bytes() == before
    assert cli("pod", "rm", "kid").exit_code == 0  # and it can go


def test_an_orphan_of_a_removed_parent_says_so(cli, family):
    family.pod_dir("lead").rename(family.pods_dir / ".lead.removed-1-2-ab")
    r, problems = doctor(cli, "--check", "child-orphan")
    assert r.exit_code == 1, r
    assert "there is no Pod 'lead' (it was removed)" in only(problems, "child-orphan")["message"]


def test_an_unlisted_child_is_reported_and_not_touched(cli, family):
    edit(family, "lead", lambda d: d.pop("children"))
    before = {n: meta_path(family, n).read_bytes() for n in ("lead", "kid")}
    p = check_found_and_fixed(cli, "child-unlisted", "kid", meta_path(family, "kid"),
                              fixable=False)
    assert "names 'lead' as its parent, but 'lead' does not list it" in p["message"]
    assert {n: meta_path(family, n).read_bytes() for n in ("lead", "kid")} == before


def test_a_dangling_child_entry_is_removed(cli, family):
    shutil.rmtree(family.pod_dir("kid"))
    p = check_found_and_fixed(cli, "child-dangling", "lead", meta_path(family, "lead"))
    assert p["message"] == "lists 'kid' as a child, but there is no Pod 'kid'"
    assert metadata.child_names(read_doc(family, "lead")) == []
    assert "children" not in read_doc(family, "lead")


def test_a_one_sided_child_entry_is_removed(cli, family):
    edit(family, "kid", lambda d: [d.pop(k) for k in ("parent", "scope", "spawn_id")])
    kid_before = meta_path(family, "kid").read_bytes()
    check_found_and_fixed(cli, "child-one-sided", "lead", meta_path(family, "lead"))
    assert metadata.child_names(read_doc(family, "lead")) == []
    assert meta_path(family, "kid").read_bytes() == kid_before


def test_a_child_of_another_parent_is_removed_from_the_wrong_list(cli, family):
    store.create(family, "boss")
    edit(family, "kid", lambda d: d.update(parent="boss"))
    edit(family, "boss", lambda d: metadata.add_child(d, "kid"))
    p = check_found_and_fixed(cli, "child-other-parent", "lead", meta_path(family, "lead"))
    assert p["message"] == "lists 'kid' as a child, but 'kid' names 'boss' as its parent, " \
                           "which lists it"
    assert metadata.child_names(read_doc(family, "lead")) == []
    assert metadata.child_names(read_doc(family, "boss")) == ["kid"]


def test_a_child_named_by_nobody_it_names_is_not_guessed_at(cli, family):
    store.create(family, "boss")
    edit(family, "kid", lambda d: d.update(parent="boss"))
    r, problems = doctor(cli, "--fix")
    assert r.exit_code == 1, r
    codes = sorted((p["code"], p["pod_name"], p["fixable"], p["fixed"]) for p in problems)
    assert codes == [("child-other-parent", "lead", False, False),
                     ("child-unlisted", "kid", False, False)], problems
    assert metadata.child_names(read_doc(family, "lead")) == ["kid"]


def test_a_cycle_of_parents_is_reported(cli, state):
    store.create(state, "a")
    store.create(state, "b")
    edit(state, "a", lambda d: d.update(parent="b") or metadata.add_child(d, "b"))
    edit(state, "b", lambda d: d.update(parent="a") or metadata.add_child(d, "a"))
    p = check_found_and_fixed(cli, "child-cycle", "a", meta_path(state, "a"), fixable=False)
    assert p["message"] == ("parents in a cycle: a -> b -> a (each names the next as its "
                            "parent); repair by hand")


def test_a_pod_that_is_its_own_parent_is_a_cycle(cli, state):
    store.create(state, "a")
    edit(state, "a", lambda d: d.update(parent="a") or metadata.add_child(d, "a"))
    r, problems = doctor(cli)
    assert [p["code"] for p in problems] == ["child-cycle"], problems


def test_a_spawn_in_progress_is_not_reported(cli, family):
    """What the doctor sees without locks in the middle of a spawn (the child made, its
    parent not written yet) is looked at again under the locks, once the spawn is done."""
    whole = meta_path(family, "lead").read_bytes()
    lock = FileLock(family.lock_path("lead"), 5).acquire()
    try:
        edit(family, "lead", lambda d: d.pop("children"))  # as mid-transaction
        found = {}
        t = threading.Thread(target=lambda: found.update(r=doctor(cli)))
        t.start()
        time.sleep(0.5)  # it has scanned, and waits for lead's lock
        atomic_write(meta_path(family, "lead"), whole)  # the transaction's second write
    finally:
        lock.release()
    t.join(30)
    r, problems = found["r"]
    assert (r.exit_code, problems) == (0, []), r


def test_the_records_are_checked(cli, state):
    store.create(state, "a")
    for bad, message in [({"scope": "world"}, 'scope must be "parent" or "peers"'),
                         ({"parent": "no/slash"}, "parent 'no/slash' is not a valid Pod name"),
                         ({"spawn_id": "xyz"}, "spawn_id must be 12 hexadecimal digits"),
                         ({"children": [{"pod_name": ""}]}, "children[0] has no valid pod_name")]:
        doc = read_doc(state, "a")
        write_doc(state, "a", {**doc, **bad})
        r, problems = doctor(cli)
        assert message in only(problems, "metadata-schema")["message"], problems
        write_doc(state, "a", doc)
