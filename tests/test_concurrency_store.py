"""No lost updates: many real processes rewriting one Pod's record at once."""

from __future__ import annotations

import tomllib

import workers
from yoi import store

WRITERS = 8
ROUNDS = 25


def start_together(procs) -> None:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def test_concurrent_updates_of_distinct_keys_are_all_kept(state):
    store.create(state, "a")
    procs = [workers.start("append-updates", state.root, "a", f"writer{i}", ROUNDS)
             for i in range(WRITERS)]
    with workers.stopping(*procs):
        start_together(procs)
        for p in procs:
            workers.finish(p)
    doc = tomllib.loads(state.metadata_path("a").read_text())
    for i in range(WRITERS):
        # Every single append is there, in order: none was overwritten by a stale copy.
        assert doc[f"writer{i}"] == list(range(1, ROUNDS + 1)), i
    assert doc["pod_name"] == "a" and doc["schema"] == 1


def test_concurrent_pod_config_commands_lose_nothing(state):
    """`yoi pod config` (three settings) racing five writers of unknown keys."""
    store.create(state, "a")
    rounds = 12
    procs = [workers.start("cli-config", state.root, "a", setting, rounds)
             for setting in ("exec", "cwd", "accept-peers")]
    procs += [workers.start("append-updates", state.root, "a", f"extra{i}", rounds)
              for i in range(WRITERS - len(procs))]
    with workers.stopping(*procs):
        start_together(procs)
        for p in procs:
            workers.finish(p)
    doc = tomllib.loads(state.metadata_path("a").read_text())
    assert doc["runtime"]["exec"] == f"handler-{rounds}"
    assert doc["runtime"]["cwd"] == f"/srv/dir-{rounds}"
    assert doc["accept_peers"] == ("open" if rounds % 2 == 0 else "never")
    for i in range(WRITERS - 3):
        assert doc[f"extra{i}"] == list(range(1, rounds + 1)), i
