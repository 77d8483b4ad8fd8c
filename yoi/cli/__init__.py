"""The ``yoi`` command line. Root group: ``yoi.cli:main``."""

from __future__ import annotations

import click

from yoi import __version__
from yoi.cli.common import CONTEXT_SETTINGS, RootGroup, root_state_options


@click.group("yoi", cls=RootGroup, context_settings=CONTEXT_SETTINGS, lazy_subcommands={
    "doctor": "yoi.cli.doctor:doctor",
    "pod": "yoi.cli.pod:pod",
    "demo": "yoi.cli.demo:demo",
    "up": "yoi.cli.up:up",
    "down": "yoi.cli.up:down",
})
@click.version_option(__version__, "--version", "-V", prog_name="yoi")
@root_state_options
def main(state_dir, lock_timeout):
    """Yoi: named, long-lived agent processes (Pods) that know about each other.

    A Pod has a metadata record and a session log under the state directory
    ($YOI_HOME, else ~/.yoi) and, while it runs, a Unix socket. Pods can be
    introduced as peers and send each other messages.

    --state-dir and --lock-timeout given here apply to the command that
    follows, unless it is given its own.

    \b
    Examples:
      yoi pod create reviewer
      yoi pod list --json
      yoi --state-dir ./.yoi pod list
    """
