"""Pod names: the narrow alphabet, and a bad name writes nothing at all (exit 2)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from yoi.errors import UsageError
from yoi.names import check_name, is_valid_name

VALID = ["a", "A", "0", "reviewer", "coder-2", "a.b_c-d", "9lives", "x" * 64, "a" + "." * 63]
INVALID = ["", ".", "..", "a/b", "/a", "a\x00b", "a\nb", "-a", "_a", ".a", "x" * 65, "a b",
           "a\tb", "é", "pod-é", "ａ", "a:b", "a\\b", "a\r", "a\n", " a", "a*", "\u0660"]

COMMANDS = [
    ["pod", "create"],
    ["pod", "create", "--exist-ok"],
    ["pod", "config", "--no-accept-peers"],
    ["pod", "show"],
    ["pod", "rm"],
]


def bad_name_message(name: str) -> str:
    return (f"yoi: error: invalid Pod name {name!r}: use 1-64 characters of "
            "[A-Za-z0-9._-], starting with a letter or digit\n")


@pytest.mark.parametrize("name", VALID)
def test_valid_names_are_accepted(name):
    assert is_valid_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_rejected(name):
    assert not is_valid_name(name)
    with pytest.raises(UsageError) as e:
        check_name(name)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("value", [None, 7, b"abc", ["a"]])
def test_non_strings_are_not_names(value):
    assert not is_valid_name(value)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("name", INVALID, ids=repr)
def test_bad_name_is_exit_2_and_creates_nothing(cli, yoi_home, command, name):
    # "--" so that a name with a leading dash reaches the name check.
    r = cli(*command, "--", name)
    assert r.exit_code == 2, r
    assert r.stderr == bad_name_message(name)
    assert r.stdout == ""
    assert not yoi_home.exists()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_name_json_failure_document(cli, yoi_home, command):
    r = cli(*command, "a/b", "--json")
    assert r.exit_code == 2, r
    assert json.loads(r.stdout) == {"ok": False, "error": {
        "code": "usage", "exit_code": 2,
        "message": "invalid Pod name 'a/b': use 1-64 characters of [A-Za-z0-9._-], "
                   "starting with a letter or digit"}}
    assert not yoi_home.exists()


def test_leading_dash_without_separator_is_an_option_error(cli, yoi_home):
    r = cli("pod", "create", "-a")
    assert r.exit_code == 2, r
    assert r.stderr == "yoi: error: no such option '-a' for yoi pod create (see 'yoi pod create -h')\n"
    assert not yoi_home.exists()


def test_bad_name_in_real_process_writes_nothing(run_yoi, yoi_home):
    r = run_yoi("pod", "create", "a\nb")
    assert r.exit_code == 2, r
    assert r.stderr == bad_name_message("a\nb")
    assert not yoi_home.exists()


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root)
            for d, dirs, files in os.walk(root) for f in dirs + files}


def test_bad_name_leaves_an_existing_state_dir_untouched(cli, yoi_home):
    assert cli("pod", "create", "a").exit_code == 0
    before = _tree(yoi_home)
    for name in INVALID:
        for command in COMMANDS:
            assert cli(*command, "--", name).exit_code == 2
    assert _tree(yoi_home) == before


# -- property: no invalid name ever creates a file -------------------------------

def _near_misses():
    valid = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
    bad_char = st.characters().filter(
        lambda c: not (c.isascii() and (c.isalnum() or c in "._-")))
    inserted = st.tuples(valid, bad_char, st.integers(0, 64)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    leading = st.tuples(st.sampled_from([".", "-", "_"]), valid).map("".join)
    too_long = st.text(alphabet="abc019._-", min_size=65, max_size=100).map(lambda s: "a" + s)
    return st.one_of(inserted, leading, too_long, st.text(max_size=80))


invalid_names = _near_misses().filter(lambda s: not is_valid_name(s))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=invalid_names, command=st.sampled_from(COMMANDS))
@example(name="..", command=["pod", "create"])
@example(name="a\x00", command=["pod", "create"])
def test_property_no_invalid_name_creates_a_file(cli, yoi_home, name, command):
    r = cli(*command, "--", name)
    assert r.exit_code == 2, r
    assert r.stderr.startswith("yoi: error: invalid Pod name ")
    assert r.stderr.count("\n") == 1  # one line, even for a name with a newline
    assert not yoi_home.exists()


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=invalid_names)
def test_property_library_refuses_invalid_names_before_writing(state, yoi_home, name):
    from yoi import store
    for call in (lambda: store.create(state, name), lambda: store.remove(state, name),
                 lambda: store.configure(state, name, accept_peers=False),
                 lambda: state.metadata_path(name), lambda: state.lock_path(name)):
        with pytest.raises(UsageError):
            call()
    assert not yoi_home.exists()
