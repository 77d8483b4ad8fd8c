"""Hostile clients cannot stall, crash or bloat a Pod, nor delay a well-behaved client."""

from __future__ import annotations

import socket
import threading


from rawsock import Raw

from yoi import protocol
from yoi.session import Entry
from yoi.client import Connection, notify


def vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # KiB
    raise AssertionError(key)


def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def test_hostile_crowd_does_not_stop_acknowledgements(state, started_pod):
    pod = started_pod("a")
    # A log big enough that each snapshot is larger than a socket buffer.
    for i in range(40):
        notify(pod.socket_path, "x" * 20000, f"fill-{i}")
    sockets: list[socket.socket] = []
    try:
        # 200 simultaneous connections that never read a byte (not even the snapshot)
        for _ in range(200):
            sockets.append(connect(pod.socket_path))
        # garbage: binary noise, with and without newlines, and a method flood it never reads
        noisy = connect(pod.socket_path)
        sockets.append(noisy)
        noisy.sendall(bytes(range(256)) * 64 + b"\n" + b"\x00garbage" * 1000)
        # a client that reads its prelude, then floods methods and never reads the answers
        flood = Raw(pod.socket_path)
        sockets.append(flood.sock)
        flood.prelude()
        flood_result = []

        def flood_it():
            line = b'{"method":"' + b"x" * 1000 + b'"}\n'
            try:
                for _ in range(2000):
                    flood.sock.sendall(line * 50)  # 100 MiB of answers would pile up
                flood_result.append("not disconnected")
            except OSError as e:
                flood_result.append(type(e).__name__)  # disconnected by the Pod

        flooder = threading.Thread(target=flood_it)
        flooder.start()

        # 100 MiB in one line, streamed; then a valid method on the same connection
        long_liner = Raw(pod.socket_path, timeout=60)
        sockets.append(long_liner.sock)
        long_liner.prelude()

        def stream_long_line():
            chunk = b"a" * (1 << 20)
            for _ in range(100):
                long_liner.sock.sendall(chunk)
            long_liner.send(b"\n" + protocol.method("notify", {"message": "after", "id": "ll"}))

        streamer = threading.Thread(target=stream_long_line)
        streamer.start()

        # meanwhile a well-behaved client gets every acknowledgement
        for i in range(20):
            ack = notify(pod.socket_path, f"good {i}", f"good-{i}", timeout=30)
            assert ack["item"]["message"] == f"good {i}"
        streamer.join(60)
        ev, _ = long_liner.until("error")
        assert ev == {"event": "error", "data": {
            "code": "invalid_request",
            "message": f"method line over {protocol.MAX_METHOD_LINE} bytes; discarded"}}
        ev, _ = long_liner.until("system_item", lambda d: d["item"].get("id") == "ll")
        assert ev["data"]["item"]["message"] == "after"
        flooder.join(60)
        assert flood_result in (["BrokenPipeError"], ["ConnectionResetError"])
    finally:
        for s in sockets:
            s.close()

    # the over-long line was never held whole: peak memory stayed far below 100 MiB
    assert vm(pod.pid, "VmHWM") < 80 * 1024
    with Connection.open(pod.socket_path, 10, keep_snapshot=True) as conn:
        assert conn.snapshot["status"] == "idle"
    entries = state.session_path("a").read_bytes().splitlines()
    assert len(entries) == 40 + 20 + 1


def test_a_client_that_never_reads_is_disconnected_not_waited_for(state, started_pod):
    from yoi.server import connection as server
    pod = started_pod("a")
    stuck = connect(pod.socket_path)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        # Broadcasts pile up for the stuck client until its queue overflows.
        big = "y" * 500_000
        n = server.OUTBOUND_LIMIT // len(big) + 8
        for i in range(n):
            notify(pod.socket_path, big, f"big-{i}", timeout=30)
        stuck.settimeout(10)
        received = 0
        try:
            while True:
                chunk = stuck.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
        # it got less than everything, then the Pod closed the connection
        assert received < n * len(big)
    finally:
        stuck.close()
    assert notify(pod.socket_path, "fine", "after")["item"]["id"] == "after"


def test_idle_connections_cost_little_memory(started_pod):
    pod = started_pod("a")
    for i in range(50):
        notify(pod.socket_path, "z" * 1000, f"fill-{i}")
    base = vm(pod.pid, "VmRSS")
    held = [Connection.open(pod.socket_path, 10) for _ in range(200)]
    try:
        for c in held[:5]:
            c.send(protocol.method("notify", {"message": "hi", "id": "idle-ping"}), 10)
        ack = notify(pod.socket_path, "hi", "idle-ping")
        assert ack["item"]["id"] == "idle-ping"
        loaded = vm(pod.pid, "VmRSS")
    finally:
        for c in held:
            c.close()
    # generous bound: a shared snapshot and small per-client state, not 200 copies
    assert loaded < base + 20 * 1024, (base, loaded)


def test_messages_waiting_for_a_slow_handler_are_not_held_in_memory(state, started_pod,
                                                                    tmp_path):
    from yoi.client import notify_pipelined
    go = tmp_path / "go"
    pod = started_pod("a", exec=f"cat >/dev/null; while [ ! -e {go} ]; do sleep 0.05; done")
    notify(pod.socket_path, "first", "first")  # the handler is now busy with it
    base = vm(pod.pid, "VmRSS")
    ids = [f"big-{i}" for i in range(200)]
    lines = [protocol.notify_method(f"{i}:" + "x" * 900_000, mid) for i, mid in enumerate(ids)]
    batch = notify_pipelined(pod.socket_path, lines, ids, timeout=60)
    assert batch.failure is None and batch.acked == 200
    waiting = vm(pod.pid, "VmRSS")
    go.touch()
    # 170 MiB of messages wait for the handler: they are in the log, not in memory
    # (what is held is the snapshot's share of them: 16 MiB)
    assert waiting < base + 80 * 1024, (base, waiting)


def mib_entry() -> Entry:
    """An entry of 1 MiB, of a kind snapshots carry."""
    return Entry("user_message", {"segments": [{"kind": "text", "content": "x" * (1 << 20)}]})


def test_idle_connections_share_the_prelude_when_there_are_alerts(state, run_yoi, started_pod):
    """A replayed alert comes before the snapshot; neither is copied per client."""
    run_yoi("pod", "create", "a")
    entries = b"".join(mib_entry().line(i) for i in range(1, 9))
    state.session_path("a").write_bytes(entries + b'{"seq":9,"kind":"text_do')  # torn: an alert
    pod = started_pod("a")
    base = vm(pod.pid, "VmRSS")
    held = []
    try:
        for _ in range(40):  # each is owed 8 MiB it never reads
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(pod.socket_path)
            held.append(s)
        with Connection.open(pod.socket_path, 30) as c:
            assert len(c.alerts) == 1 and "torn line" in c.alerts[0]["message"]
        loaded = vm(pod.pid, "VmRSS")
    finally:
        for s in held:
            s.close()
    assert loaded < base + 40 * 1024, (base, loaded)  # not 40 copies of 8 MiB


def test_clients_that_never_read_cannot_pile_up_old_snapshots(state, run_yoi, started_pod):
    """Each connects after another commit, so each is owed a different 4 MiB snapshot:
    beyond PINNED_LIMIT bytes of them, the clients owed the oldest are disconnected."""
    from yoi.server import connection as server
    run_yoi("pod", "create", "a")
    state.session_path("a").write_bytes(
        b"".join(mib_entry().line(i) for i in range(1, 5)))
    pod = started_pod("a")
    stuck = []
    try:
        with Raw(pod.socket_path) as writer:
            writer.prelude()
            for i in range(100):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(pod.socket_path)
                stuck.append(s)
                writer.send({"method": "notify", "params": {"message": "m", "id": f"m-{i}"}})
                writer.until("system_item")
        closed = []
        for s in stuck:
            s.settimeout(0.05)
            try:
                while s.recv(1 << 20):
                    pass
                closed.append(True)  # the Pod closed it
            except socket.timeout:
                closed.append(False)  # still waiting for the rest of its snapshot
    finally:
        for s in stuck:
            s.close()
    held = closed.count(False)
    assert closed == [True] * (100 - held) + [False] * held
    assert 0 < held * (4 << 20) <= server.PINNED_LIMIT
    assert notify(pod.socket_path, "fine", "after")["item"]["id"] == "after"


def test_a_client_is_not_read_while_its_commits_in_progress_hold_pending_bytes(tmp_path):
    """Besides PENDING_LIMIT answers, a client is owed at most PENDING_BYTES of entries
    being committed before its further lines wait unread: 1 MB messages written far
    ahead cost the Pod a bounded amount, however slow its disk. (The Hub as a Pod runs
    it, with a method handler that commits nothing: the commits are the point.)"""
    import time
    from yoi.server.connection import PENDING_BYTES, Hub
    from yoi.server.loop import Loop
    loop = Loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "hub.sock")
    listener.bind(path)
    listener.listen(4)
    owed, handed = [], []

    def on_line(c, line):  # a commit that holds the message twice (message and body)
        owed.append((c, 2 * len(line)))
        handed.append(line)
        hub.owe(c, 2 * len(line))

    hub = Hub(loop, listener, on_line, lambda: (b"", b'{"event":"snapshot","data":{}}\n'))
    hub.start_accepting()
    size, n = 1 << 20, 40

    def pump(until, seconds=10.0):
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            loop.run_once(0.01)

    try:
        with Raw(path) as c:
            pump(lambda: hub.clients)
            pump(lambda: c.pending())
            writer = threading.Thread(target=c.send, args=(b"".join(
                b'{"x":"' + b"y" * (size - 9) + b'"}\n' for _ in range(n)),))
            writer.start()
            held = 2 * (size - 1)  # per line (without its newline)
            enough = -(-PENDING_BYTES // held)  # lines that reach PENDING_BYTES
            pump(lambda: len(owed) >= enough, 10)
            pump(lambda: False, 0.5)  # and then nothing more is handed over
            assert len(owed) == enough < n
            while len(handed) < n and owed:  # the commits land: the rest is read
                while owed:
                    hub.paid(*owed.pop())
                pump(lambda: owed, 5)
            writer.join(10)
            assert len(handed) == n and not writer.is_alive()
    finally:
        hub.close_all()
        listener.close()
        loop.close()


def test_a_burst_of_commits_gives_its_heap_back_once_the_pod_is_quiet(monkeypatch):
    """After TRIM_AFTER commits, the first TRIM_QUIET seconds without a commit return the
    C heap's free memory (once); fewer commits, or commits still coming, do not."""
    import time
    from yoi.server import loop as loop_mod
    trims = []
    monkeypatch.setattr(loop_mod, "release_memory", lambda: trims.append(1) or True)
    loop = loop_mod.Loop()
    trimmer = loop_mod.Trimmer(loop)

    def pump(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            loop.run_once(0.01)

    for _ in range(loop_mod.TRIM_AFTER - 1):
        trimmer.count()
    pump(3 * loop_mod.TRIM_QUIET)
    assert trims == []                      # not a burst yet
    trimmer.count()
    for _ in range(5):                      # commits keep coming: no trim while they do
        pump(loop_mod.TRIM_QUIET / 2)
        trimmer.count()
    assert trims == []
    pump(3 * loop_mod.TRIM_QUIET)
    assert trims == [1]                     # quiet: trimmed once
    pump(3 * loop_mod.TRIM_QUIET)
    assert trims == [1] and not trimmer.armed


def test_release_memory_reaches_the_c_library():
    import platform
    from yoi.server.loop import release_memory
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert release_memory() is True


def test_a_relation_is_checked_again_for_each_chunk_of_input(state, tmp_path):
    """The Pod checks the relation once per chunk of one client's input: lines read
    from another client in the same loop iteration may have been written after the
    relation was removed, and must see it gone."""
    from yoi import peers, store
    from yoi.server.connection import Client, Hub
    from yoi.server.pod import Pod
    store.create(state, "a")
    store.create(state, "b")
    peers.register(state, "a", "b")
    pod = Pod(state, "b")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "b.sock"))
    pod.hub = Hub(pod.loop, listener, lambda c, line: None, lambda: (b"", b""))
    one, other = socket.socketpair()
    try:
        reader = Client(one)
        assert pod.peer_refusal("a") is None
        peers.unregister(state, "a", "b")
        assert pod.peer_refusal("a") is None   # the same chunk: checked once
        pod.hub._feed(reader, b"")             # another chunk, the same loop iteration
        assert "is not a peer of 'b'" in pod.peer_refusal("a")
    finally:
        one.close()
        other.close()
        listener.close()
