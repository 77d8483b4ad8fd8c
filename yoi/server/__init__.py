"""The Pod process: one per Pod, serving PROTOCOL.md on a Unix socket.

Imported only by ``yoi pod start --foreground`` (a detached start runs that
in a child process), so ``yoi --version`` and ``yoi pod list`` never pay for
it. The modules, one job each:

* ``loop``: the selector loop, timers, wake-up from other threads, signals;
* ``connection``: accepting clients, line framing, bounded queues, hang-ups;
* ``methods``: the protocol methods, a table from method name to function;
* ``operations``: threads for methods that take locks or probe other Pods;
* ``worker``: the handler (``--exec``) process for each committed message;
* ``children``: a parent's watch over its spawned children, a child's word
  to its parent;
* ``pod``: start-up, shut-down, commits, the snapshot and alerts.

Threads: the main thread runs the loop and owns every connection and all
in-memory state; the session writer (``yoi.session``) commits in groups; the
handler worker runs one handler at a time, in commit order; two operation
threads run lock-taking methods; the child watcher reads the logs of the
Pod's children. They reach the loop only through
``Loop.call_soon``.
"""

from __future__ import annotations

from yoi.server.pod import Pod
from yoi.state import State


def serve(state: State, name: str, exec_cmd: str | None = None, ready=None) -> int:
    """Run Pod NAME in this process until shutdown; returns the exit status (0)."""
    return Pod(state, name, exec_cmd).serve(ready)
