"""A fork server for kill loops over trees of Pods (spawn and ``rm --recursive``).

Run as ``python tests/tree_worker.py STATE_DIR``; it imports ``yoi`` once, then
for each stdin line:

``rm NAME``     forks a child that removes NAME's tree (``store.remove(...,
                recursive=True)``) and exits 0 (1 on a YoiError);
``spawn P C``   forks a child that spawns C under P without starting it
                (``children.create_child``);

and prints ``pid CHILD``, reaps it, and prints ``exit STATUS`` (negative: killed
by that signal). The test kills the child whenever it likes in between. Forking
from a process that has imported ``yoi`` makes a round cost milliseconds.
"""

from __future__ import annotations

import os
import sys


def main(state_dir: str) -> int:
    from yoi import children, store
    from yoi.errors import YoiError
    from yoi.state import State
    state = State.resolve(state_dir)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if words[0] == "rm":
                    store.remove(state, words[1], recursive=True)
                elif words[0] == "spawn":
                    children.create_child(state, words[1], words[2])
            except YoiError:
                code = 1
            os._exit(code)
        os.write(1, f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        os.write(1, f"exit {code}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
