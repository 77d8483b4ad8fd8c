"""How fast is `yoi doctor` on a large state directory, as a ratio to a bare loop?

The target (the doctor issue): on 10,000 Pods with 50,000 relations, a full
check takes at most ~2.5x as long as a bare loop that reads and
tomllib-parses the same metadata files. Both are measured in the same run,
interleaved, best of several rounds, so the ratio holds on a busy machine.

    python bench/doctor_bench.py [--pods 10000] [--relations 50000] [--rounds 3]

Prints the timings and the ratio (also into bench/results.json); exits 1 if
the ratio is over the target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoi import doctor, metadata  # noqa: E402
from yoi.state import State  # noqa: E402

TARGET = 2.5


def build(root: Path, pods: int, relations: int) -> State:
    """A healthy state directory with PODS Pods and RELATIONS reciprocal relations."""
    state = State.resolve(root)
    state.ensure()
    rng = random.Random(1)
    names = [f"pod-{i:05d}" for i in range(pods)]
    lists: dict[str, list[dict]] = {n: [] for n in names}
    pairs: set[tuple[str, str]] = set()
    now = metadata.utcnow()
    while len(pairs) < relations:
        a, b = sorted(rng.sample(names, 2))
        if (a, b) not in pairs:
            pairs.add((a, b))
            lists[a].append({"pod_name": b, "registered_at": now})
            lists[b].append({"pod_name": a, "registered_at": now})
    session = b'{"kind": "user", "text": "hello"}\n' * 20
    for name in names:
        pod_dir = state.pod_dir(name)
        os.mkdir(pod_dir, 0o700)
        record = metadata.new_record(name, exec_cmd="agent --stdin", cwd="/srv/agents")
        record["peers"] = lists[name]
        (pod_dir / "metadata.toml").write_bytes(metadata.dumps(record))
        (pod_dir / "session.jsonl").write_bytes(session)
    return state


def bare_loop(state: State) -> None:
    pods_dir = str(state.pods_dir)
    for name in os.listdir(pods_dir):
        with open(os.path.join(pods_dir, name, "metadata.toml"), "rb") as f:
            tomllib.loads(f.read().decode("utf-8"))


def full_check(state: State) -> None:
    report = doctor.run(state)
    assert report.problems == [], report.problems[:3]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--relations", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="yoi-bench-") as tmp:
        t = time.perf_counter()
        state = build(Path(tmp) / "state", args.pods, args.relations)
        print(f"built {args.pods} Pods / {args.relations} relations in "
              f"{time.perf_counter() - t:.1f}s")
        best = {"bare": float("inf"), "doctor": float("inf")}
        for _ in range(args.rounds):
            for label, fn in (("bare", bare_loop), ("doctor", full_check)):
                t = time.perf_counter()
                fn(state)
                best[label] = min(best[label], time.perf_counter() - t)
    ratio = best["doctor"] / best["bare"]
    print(f"bare loop {best['bare']:.2f}s, yoi doctor {best['doctor']:.2f}s: "
          f"ratio {ratio:.2f} (target <= {TARGET})")
    results = Path(__file__).with_name("results.json")
    previous = json.loads(results.read_text()) if results.exists() else {}
    previous["doctor"] = {"pods": args.pods, "relations": args.relations,
                          "bare_s": round(best["bare"], 3), "doctor_s": round(best["doctor"], 3),
                          "ratio": round(ratio, 2), "target": TARGET}
    results.write_text(json.dumps(previous, indent=2) + "\n")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
