"""A CI job as a user writes it: bash with `set -euo pipefail`, `jq`, `yoi up`, labels,
`send --json`, `doctor` as a gate and `yoi down`, beside another job's Pods."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from yoi import control, store

JQ = shutil.which("jq")

YOI_TOML = """
[pods.reviewer]
peers = ["coder"]

[pods.coder]
exec = "cat"
"""

SCRIPT = r"""
set -euo pipefail
yoi() { "$PYTHON" -m yoi "$@"; }
JOB="$1"

# Cleanup stops only this job's Pods, whatever else shares $YOI_HOME.
trap 'yoi pod stop --label "job=$JOB" --json | jq -e .ok >/dev/null' EXIT

yoi up --label "job=$JOB" --json | jq -e '.ok and (.failed | length == 0)' >/dev/null
yoi up --label "job=$JOB" --json | jq -e '.changed == false' >/dev/null
yoi pod create "worker-$JOB" --label "job=$JOB" --exec cat --json | jq -e '.created' >/dev/null
yoi pod start "worker-$JOB" --json | jq -e '.pod_name == "worker-'"$JOB"'"' >/dev/null

live=$(yoi pod list --label "job=$JOB" --json | jq '[.pods[] | select(.live.reachable)] | length')
test "$live" -eq 3

id=$(yoi pod send --id "build-$JOB" --json reviewer "build $JOB is green" | jq -r .id)
test "$id" = "build-$JOB"
yoi pod send --from reviewer --json coder "please review $JOB" \
  | jq -e '.acknowledged and .source.pod_name == "reviewer"' >/dev/null
printf 'step 1\nstep 2\n' | yoi pod send --lines --id "steps-$JOB" --json "worker-$JOB" \
  | jq -e '.acknowledged_count == 2' >/dev/null
yoi pod log coder --json | jq -s -e 'map(select(.kind == "system_item")) | length == 1' >/dev/null

yoi doctor --json | jq -e '.errors == 0' >/dev/null
yoi down --rm --json | jq -e '[.changes[] | select(.action == "removed")] | length == 2' >/dev/null
echo "job $JOB: ok"
"""


@pytest.mark.skipif(JQ is None, reason="jq is not installed (Debian package jq); the CI "
                                       "machine image has it")
def test_a_ci_job_with_set_euo_pipefail_and_jq(tmp_path, state, started_pod):
    other = started_pod("other-job-pod", exec="cat")
    store.configure(state, other.name, set_labels={"job": "other"})
    project = tmp_path / "project"
    project.mkdir()
    (project / "yoi.toml").write_text(YOI_TOML)
    (project / "ci.sh").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", "ci.sh", "4711"], cwd=project, env=env, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stdout) == (0, "job 4711: ok\n"), p.stderr
    assert not control.is_running(state, "worker-4711")  # stopped by its own cleanup
    assert control.is_running(state, other.name)  # another job's Pod is left alone
    assert sorted(state.pod_names()) == ["other-job-pod", "worker-4711"]
