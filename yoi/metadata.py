"""metadata.toml: parse, check and serialise a Pod's current-state record.

A record is kept as the plain dict ``tomllib`` returns, so keys this version
does not know survive a rewrite untouched.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from pathlib import Path

from yoi.errors import CorruptMetadata
from yoi.names import is_valid_name
from yoi.parsing import ParseError, toml_loads

SCHEMA = 1


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def new_record(name: str, exec_cmd: str | None = None, cwd: str | None = None,
               accept_peers: bool = True, handler_timeout: float | None = None,
               labels: dict[str, str] | None = None) -> dict:
    record: dict = {
        "schema": SCHEMA,
        "pod_name": name,
        "created_at": utcnow(),
        "accept_peers": accept_peers,
        "runtime": {},
        "peers": [],
    }
    if exec_cmd is not None:
        record["runtime"]["exec"] = exec_cmd
    if cwd is not None:
        record["runtime"]["cwd"] = cwd
    if handler_timeout is not None:
        record["runtime"]["handler_timeout"] = handler_timeout
    if labels:
        record["labels"] = dict(sorted(labels.items()))
    return record


# -- labels: KEY=VALUE tags a job puts on its Pods (`yoi pod list --label`) ----------

LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z", re.ASCII)
LABEL_VALUE_MAX = 256


def label_problem(key: object, value: object) -> str | None:
    """What is wrong with the label KEY=VALUE, or None."""
    if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
        return (f"label key {key!r}: use 1-63 characters of [A-Za-z0-9._/-], "
                "starting with a letter or digit")
    if not isinstance(value, str):
        return f"label {key}: the value must be a string, not {value!r}"
    if len(value) > LABEL_VALUE_MAX or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return (f"label {key}: the value must be at most {LABEL_VALUE_MAX} characters "
                "without control characters")
    return None


def labels_of(doc: dict | None) -> dict[str, str]:
    labels = (doc or {}).get("labels")
    return dict(labels) if isinstance(labels, dict) else {}


def has_labels(doc: dict | None, wanted: dict[str, str]) -> bool:
    """True if DOC carries every label in WANTED with the same value."""
    have = labels_of(doc)
    return all(have.get(k) == v for k, v in wanted.items())


def settings_of(doc: dict) -> dict:
    """The settings a user gives (create, config, yoi.toml), as stored in DOC."""
    runtime = doc.get("runtime") or {}
    return {"exec": runtime.get("exec"), "cwd": runtime.get("cwd"),
            "accept_peers": accepts_peers(doc),
            "handler_timeout": runtime.get("handler_timeout"), "labels": labels_of(doc)}


def setting_differences(doc: dict, wanted: dict) -> list[dict]:
    """The settings in WANTED (keys of ``settings_of``) whose stored value differs."""
    have = settings_of(doc)
    return [{"setting": k, "stored": have[k], "given": v}
            for k, v in wanted.items() if have[k] != v]


def parse(text: bytes | str, path: Path | str, expect_name: str | None = None) -> dict:
    """Parse and check a record; raise CorruptMetadata naming PATH on any problem."""
    doc = loads(text, path)
    problem = schema_problem(doc, expect_name)
    if problem:
        raise CorruptMetadata(f"{path}: {problem}", path=str(path))
    return doc


def loads(text: bytes | str, path: Path | str, what: str = "") -> dict:
    """Decode and parse a TOML state file without the schema check (the one place
    that does: records and journals alike); CorruptMetadata naming PATH, WHAT
    (e.g. "journal ") saying what the file is."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text.count(b"\n", 0, e.start) + 1
            column = e.start - text.rfind(b"\n", 0, e.start)
            raise CorruptMetadata(f"{path}: {what}not UTF-8 (at line {line}, column {column})",
                                  path=str(path), line=line, column=column)
    try:
        return toml_loads(text)
    except ParseError as e:
        raise CorruptMetadata(f"{path}: {what}does not parse: {e}", path=str(path),
                              **_line_col(str(e)))


def _line_col(message: str) -> dict:
    m = re.search(r"line (\d+), column (\d+)", message)
    return {"line": int(m.group(1)), "column": int(m.group(2))} if m else {}


# The [runtime] hints and settings, and the types every reader of them expects.
RUNTIME_TYPES = {"pid": (int, "an integer"), "socket_path": (str, "a string"),
                 "exec": (str, "a string"), "cwd": (str, "a string"),
                 "handler_timeout": ((int, float), "a number of seconds above 0")}


def schema_problem(doc: dict, expect_name: str | None = None) -> str | None:
    """Describe the first schema violation in DOC, or return None."""
    if doc.get("schema") != SCHEMA:
        return f"unsupported schema {doc.get('schema')!r} (expected {SCHEMA})"
    name = doc.get("pod_name")
    if not is_valid_name(name):
        return f"pod_name {name!r} is missing or not a valid Pod name"
    if expect_name is not None and name != expect_name:
        return f"pod_name {name!r} does not match its directory {expect_name!r}"
    if "accept_peers" in doc and not isinstance(doc["accept_peers"], bool):
        return "accept_peers must be true or false"
    if "runtime" in doc and not isinstance(doc["runtime"], dict):
        return "runtime must be a table"
    for key, (kind, what) in RUNTIME_TYPES.items():
        value = (doc.get("runtime") or {}).get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                  or (key == "handler_timeout" and not 0 < value < math.inf)):
            return f"runtime.{key} must be {what}, not {value!r}"
    labels = doc.get("labels", {})
    if not isinstance(labels, dict):
        return "labels must be a table"
    for key, value in labels.items():
        problem = label_problem(key, value)
        if problem:
            return problem
    peers = doc.get("peers", [])
    if not isinstance(peers, list):
        return "peers must be an array of tables"
    for i, p in enumerate(peers):
        if not isinstance(p, dict) or not is_valid_name(p.get("pod_name")):
            return f"peers[{i}] has no valid pod_name"
    return None


def dumps(doc: dict) -> bytes:
    import tomli_w  # measured: ~3 ms that readers (list, show, send) do not pay
    return tomli_w.dumps(doc).encode("utf-8")


def peer_names(doc: dict) -> list[str]:
    return [p["pod_name"] for p in doc.get("peers", [])]


def has_peer(doc: dict, name: str) -> bool:
    return any(p.get("pod_name") == name for p in doc.get("peers", []))


def drop_peer(doc: dict, name: str) -> None:
    """Remove every entry for NAME from DOC's peer list."""
    doc["peers"] = [p for p in doc.get("peers", []) if p.get("pod_name") != name]


def accepts_peers(doc: dict) -> bool:
    return doc.get("accept_peers", True) is True


def to_jsonable(value):
    """TOML values -> JSON values (datetimes as RFC 3339 with Z)."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None and value.utcoffset() == _dt.timedelta(0):
            return value.replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    return value
