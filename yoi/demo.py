"""``yoi demo``: the main job of Yoi, end to end, on an embedded default.

Each step runs the real ``yoi`` command line in a subprocess against a
temporary state directory and prints the command a user would type, so the
demo exercises exactly what a user gets, and doubles as a smoke test.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from yoi.errors import Failed

# Pod "coder" (on `--accept-peers ask`) approves every peer request it is
# asked, and answers every message it is sent by messaging its sender back.
HANDLER = ('if [ "$YOI_EVENT" = peer_request ]; then echo approve; exit 0; fi; '
           'msg=$(cat); {yoi} pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" '
           '"pong from $YOI_POD: got \\"$msg\\""')


# reviewer's two children: each gets the same task and answers in its own way.
CHILDREN = (("words", "wc -w"), ("shout", "tr a-z A-Z"))


def yoi_argv() -> list[str]:
    return [sys.executable, "-P", "-m", "yoi"]  # -P: never a yoi/ in the current directory


class Demo:
    def __init__(self, state: Path, echo: Callable[[str], None], timeout: float = 30.0):
        self.state = state
        self.echo = echo
        self.timeout = timeout
        self.env = dict(os.environ)
        self.env["YOI_HOME"] = str(state)
        self.env.pop("YOI_POD", None)
        self.env.pop("YOI_FAULT", None)
        self.steps = 0
        self.record: list[dict] = []  # every step run: command line and exit code

    def yoi(self, *args: str, show: bool = True, check: bool = True) -> subprocess.CompletedProcess:
        if show:
            self.steps += 1
            self.echo(f"\n[{self.steps}] $ yoi {shlex.join(args)}")
        p = subprocess.run(yoi_argv() + list(args), env=self.env, capture_output=True,
                           text=True, timeout=self.timeout + 30, stdin=subprocess.DEVNULL)
        if show:
            self.record.append({"command": "yoi " + shlex.join(args), "exit_code": p.returncode})
            # Progress (stderr) comes before a result; an error (stderr) after what was done.
            shown = p.stderr + p.stdout if p.returncode == 0 else p.stdout + p.stderr
            for line in shown.rstrip("\n").splitlines():
                self.echo(f"    {line}")
        if check and p.returncode != 0:
            last = (p.stderr or p.stdout).strip().splitlines()
            raise Failed(f"demo step `yoi {shlex.join(args)}` exited {p.returncode}"
                         + (f": {last[-1]}" if last else ""))
        return p

    def ask(self, source: str, target: str, message: str, msg_id: str) -> dict:
        """``yoi pod send --from SOURCE TARGET MESSAGE --id ID --wait-reply``; the reply."""
        self.yoi("pod", "send", "--from", source, target, message, "--id", msg_id,
                 "--wait-reply", f"{self.timeout:g}")
        step = self.record[-1]
        p = self.yoi("pod", "wait", source, "--reply-to", msg_id, "--json", show=False)
        reply = json.loads(p.stdout)["entry"]["item"]
        step["reply"] = reply["message"]
        return reply

    def collect(self, parent: str, child: str) -> dict:
        """``yoi pod wait PARENT --from CHILD --kind child_completed``: CHILD's result."""
        self.yoi("pod", "wait", parent, "--from", child, "--kind", "child_completed",
                 "--timeout", f"{self.timeout:g}")
        step = self.record[-1]
        p = self.yoi("pod", "wait", parent, "--from", child, "--kind", "child_completed",
                     "--json", show=False)
        entry = json.loads(p.stdout)["entry"]
        step["output"] = entry["output"]
        return entry

    def run(self, remove_pods: bool = False) -> None:
        """Every step; the Pods are stopped (and with REMOVE_PODS removed) also on failure."""
        handler = HANDLER.format(yoi=shlex.join(yoi_argv()))
        created, started, parents = [], [], set()
        try:
            self.yoi("pod", "create", "reviewer")
            created.append("reviewer")
            self.yoi("pod", "create", "coder", "--accept-peers", "ask", "--exec", handler)
            created.append("coder")
            for name in ("reviewer", "coder"):
                self.yoi("pod", "start", name)
                started.append(name)
            # Introduced while they run: coder is asked, its handler approves, and
            # live Pods see the new relation at once.
            self.yoi("pod", "peer", "register", "reviewer", "coder",
                     "--wait", f"{self.timeout:g}")
            self.yoi("pod", "list")
            # A question, and its answer: the reply to this very message.
            self.ask("reviewer", "coder", "please review PR 42", "pr-42")
            self.yoi("pod", "log", "coder")
            # Fan out: reviewer hands a task to each of two children it owns, and
            # collects both results from its own log.
            parents.add("reviewer")
            for child, command in CHILDREN:
                self.yoi("pod", "spawn", "reviewer", child, "--exec", command,
                         "--task", "please review PR 42")
            for child, _ in CHILDREN:
                self.collect("reviewer", child)
            self.yoi("pod", "list", "--as", "reviewer")
            self.yoi("doctor")
        finally:
            # A parent stops (and goes) with its children: --recursive.
            for name in reversed(started):
                self.yoi("pod", "stop", name, *(["--recursive"] if name in parents else []),
                         check=False)
            # Only the Pods this demo created: never one that was there before.
            for name in reversed(created if remove_pods else []):
                self.yoi("pod", "rm", name, *(["--recursive"] if name in parents else []),
                         check=False)


def run_demo(state_dir: str | None, keep: bool, echo: Callable[[str], None]
             ) -> tuple[Path, list[dict]]:
    """Run the demo; return the state directory used and its steps.

    Unless KEEP, everything the demo made is removed afterwards: the state
    directory if the demo made it (a temporary one, or a STATE_DIR that did
    not exist), else the Pods it created there (two, and the two children of one).
    """
    if state_dir is None:
        state, own = Path(tempfile.mkdtemp(prefix="yoi-demo-")), True
    else:
        state = Path(state_dir).resolve()
        own = not os.path.lexists(state)
    if keep:
        note = ""
    elif own:
        note = " (removed afterwards)"
    else:
        note = " (the demo's Pods are removed afterwards)"
    echo(f"state directory: {state}{note}")
    demo = Demo(state, echo)
    try:
        demo.run(remove_pods=not keep and not own)
    finally:
        if own and not keep:
            shutil.rmtree(state, ignore_errors=True)
    return state, demo.record
