"""``yoi doctor``: check the state directory and repair what can be repaired safely."""

from __future__ import annotations

import sys
import time

import click

from yoi.cli.common import YoiCommand, emit, json_option, note_missing_state, state_options


class _Progress:
    """A ``\\r`` counter on stderr, shown only once a run takes more than a moment."""

    DELAY = 0.5  # seconds before the counter appears
    INTERVAL = 0.1  # seconds between redraws

    def __init__(self):
        self.start = self.drawn = time.monotonic()
        self.width = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.start < self.DELAY or (self.width and now - self.drawn < self.INTERVAL):
            return
        self.drawn = now
        text = f"yoi doctor: {phase} {done}/{total}"
        click.echo(f"\r{text:<{self.width}}", err=True, nl=False)
        self.width = max(self.width, len(text))

    def clear(self) -> None:
        if self.width:
            click.echo(f"\r{'':<{self.width}}\r", err=True, nl=False)


def _line(p, fix: bool) -> str:
    if p.fixed:
        status = "fixed"
    elif not p.fixable:
        status = "not fixable"
    else:
        status = "not fixed" if fix else "fixable with --fix"
    return f"{p.code} {p.pod or '-'}: {p.message} ({p.path}) [{p.severity}, {status}]"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _summary(report, fix: bool) -> str:
    c = report.checked
    what = ", ".join(_count(c[key], noun) for key, noun in (
        ("pods", "Pod"), ("relations", "relation"), ("journals", "journal"),
        ("sessions", "session log"), ("sockets", "socket")))
    if not report.problems:
        return f"no problems found (checked {what})"
    n = len(report.problems)
    noun = "problem" if n == 1 else "problems"
    left = (f"{_count(report.count('error'), 'error')}, "
            f"{_count(report.count('warning'), 'warning')}")
    if fix:
        fixed = n - len(report.remaining)
        return (f"{n} {noun} found, {fixed} fixed, {len(report.remaining)} remaining "
                f"({left}) (checked {what})")
    fixable = sum(1 for p in report.problems if p.fixable)
    return f"{n} {noun} found ({left}), {fixable} fixable with --fix (checked {what})"


def _complete_codes(ctx, param, incomplete):
    from click.shell_completion import CompletionItem
    from yoi.doctor import CHECKS
    return [CompletionItem(c) for c in CHECKS if c.startswith(incomplete)]


@click.command("doctor", cls=YoiCommand)
@click.option("--fix", is_flag=True,
              help="Repair what can be repaired safely, under the same locks as every command.")
@click.option("--check", "codes", multiple=True, metavar="CODE",
              shell_complete=_complete_codes,
              help="Run only this check (repeatable; see --list-checks).")
@click.option("--strict", is_flag=True,
              help="Fail (exit 1) on warnings too, not only on errors.")
@click.option("--list-checks", is_flag=True, help="List the check codes and exit.")
@json_option
@state_options
def doctor(fix, codes, strict, list_checks, as_json, state):
    """Check the state directory; with --fix, repair what can be repaired safely.

    Prints one line per finding, `CODE POD: message (path) [severity,
    status]`, then a summary. Every check is an error or a warning (see
    --list-checks): a warning is a harmless leftover of a crash that --fix or
    the next start clears (a stale socket or pid hint, a temp file). Exits 0
    when no error remains (with --strict: no warning either), 1 when one
    does, 2 on a usage error. Repairs never rewrite or delete a metadata file
    that does not parse, and a torn last line of a session log is moved aside
    into session.jsonl.torn-TIME, not deleted.

    \b
    Examples:
      yoi doctor
      yoi doctor --fix --json
      yoi doctor --strict
      yoi doctor --check peer-one-sided --check peer-dangling
      yoi doctor --list-checks
    """
    from yoi import doctor as lib

    if list_checks:
        rows = [{"code": code, "severity": lib.severity(code), "description": desc,
                 "fixable": fixable} for code, (desc, fixable) in lib.CHECKS.items()]
        width = max(len(code) for code in lib.CHECKS)
        emit(as_json, {"checks": rows},
             "\n".join(f"{r['code']:<{width}}  {r['severity']:<7}  {r['description']}"
                       for r in rows))
        return
    wanted = lib.check_codes(codes) if codes else None
    note_missing_state(state)
    progress = _Progress() if not as_json and sys.stderr.isatty() else None
    try:
        report = lib.run(state, fix=fix, codes=wanted, progress=progress, strict=strict)
    finally:
        if progress is not None:
            progress.clear()
    summary = _summary(report, fix)
    text = "\n".join([*(_line(p, fix) for p in report.problems), summary])
    if report.ok:
        emit(as_json, report.to_json(), text)
        return
    if not as_json:
        click.echo(text)
    from yoi.errors import Failed
    raise Failed(summary, data=report.to_json())
