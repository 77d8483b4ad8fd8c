"""The manuals under man/: they render cleanly, have the sections of a real
manual, document every command and option of the `yoi` tree and every doctor
check, and are installed where `man` finds them."""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from clitree import walk
from yoi.cli import main
from yoi.cli.common import CONTEXT_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = sorted(MAN.glob("yoi*.1"))
ROOT_PAGE = MAN / "yoi.1"
REQUIRED_SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS",
                     "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"]
COMMANDS = list(walk(main))
GROFF = shutil.which("groff")
needs_groff = pytest.mark.skipif(GROFF is None, reason="groff is not installed")


@functools.cache
def render(page: Path) -> str:
    """PAGE as plain text, one line per paragraph (no filling, so no hyphenation)."""
    p = subprocess.run([GROFF, "-man", "-Tutf8", "-rLL=20000n", "-P-cbou", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.replace("\u2010", "-").replace("\u2212", "-")


class Page:
    """A rendered page split into sections (.SH) and subsections (.SS)."""

    def __init__(self, page: Path):
        self.name = page.name
        self.sections: dict[str, str] = {}
        self.subsections: dict[str, str] = {}
        section = sub = None
        for line in render(page).splitlines():
            if re.fullmatch(r"[A-Z][A-Z ]*", line):  # .SH: flush left, upper case
                section, sub = line, None
                self.sections[section] = ""
                continue
            if section is None:
                continue
            if re.match(r" {3}\S", line):  # .SS: indented by 3
                sub = line.strip()
                self.subsections[sub] = ""
            self.sections[section] += line + "\n"
            if sub is not None:
                self.subsections[sub] += line + "\n"

    def section(self, title: str) -> str:
        assert title in self.sections, f"{self.name} has no {title} section"
        return self.sections[title]


@functools.cache
def page(path: Path) -> Page:
    return Page(path)


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def tagged(text: str) -> dict[str, str]:
    """The .TP entries of a section: first word of the tag -> the entry's text."""
    entries: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent == 7:
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif key is not None and line.strip():
            entries[key] += "\n" + line
    return entries


def page_for(path: tuple[str, ...]) -> Path:
    """yoi X ... is documented in yoi-X.1 if there is one, else in yoi.1."""
    if len(path) > 1 and (MAN / f"yoi-{path[1]}.1").exists():
        return MAN / f"yoi-{path[1]}.1"
    return ROOT_PAGE


def is_page_root(path: tuple[str, ...]) -> bool:
    return page_for(path).name == "-".join(path) + ".1"


def documentation(path: tuple[str, ...]) -> str:
    """What documents PATH's options: its subsection, if any, and its page's OPTIONS."""
    where = page(page_for(path))
    return where.subsections.get(" ".join(path), "") + where.section("OPTIONS")


def synopsis_commands() -> set[tuple[str, ...]]:
    """The command paths the pages' SYNOPSIS sections name (yoi, yoi pod, yoi pod create...)."""
    found = set()
    for path in PAGES:
        for line in page(path).section("SYNOPSIS").splitlines():
            words = re.match(r"\s*((?:[a-z][a-z-]*(?: |$))+)", line)
            if words and words.group(1).startswith("yoi"):
                found.add(tuple(words.group(1).split()))
    return found


def option_names(command: click.Command) -> list[str]:
    # Not command.get_params(): Click caches the help option it builds, and a context
    # made here would lack the tree's help option names (-h) and break later tests.
    names = [opt for p in command.params if isinstance(p, click.Option)
             for opt in (*p.opts, *p.secondary_opts)]
    return names + (CONTEXT_SETTINGS["help_option_names"] if command.add_help_option else [])


# -- every page ---------------------------------------------------------------------

def test_the_pages_are_there():
    assert {"yoi.1", "yoi-pod.1", "yoi-doctor.1", "yoi-demo.1"} <= {p.name for p in PAGES}


@needs_groff
@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_page_renders_without_warnings(path):
    p = subprocess.run([GROFF, "-man", "-Tutf8", "-ww", "-z", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (0, "")


@needs_groff
@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_page_has_the_sections_of_a_manual_in_order(path):
    titles = list(page(path).sections)
    assert [t for t in titles if t in REQUIRED_SECTIONS] == REQUIRED_SECTIONS, titles
    name = path.name[:-2]
    assert page(path).section("NAME").strip().startswith(f"{name} - ")
    first = path.read_text().splitlines()[0]
    assert first.startswith(".TH " + name.upper().replace("-", "\\-") + " 1 ")


@needs_groff
def test_the_overview_points_to_every_page():
    see_also = page(ROOT_PAGE).section("SEE ALSO")
    for path in PAGES:
        if path != ROOT_PAGE:
            assert f"{path.name[:-2]}(1)" in see_also


# -- the command tree ---------------------------------------------------------------

@needs_groff
@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_and_option_is_documented(path, command):
    """A command, or an option, that is added without documentation fails here."""
    where = page(page_for(path))
    title = " ".join(path)
    synopsis = where.section("SYNOPSIS")
    assert re.search(rf"^\s*{re.escape(title)}(\s|$)", synopsis, re.M), \
        f"{title} is not in the SYNOPSIS of {where.name}"
    if path[1:] and page_for(path) != ROOT_PAGE:
        # The overview's synopsis names every top-level command too.
        assert re.search(rf"^\s*yoi {path[1]}(\s|$)", page(ROOT_PAGE).section("SYNOPSIS"), re.M)
    if not (is_page_root(path) or isinstance(command, click.Group)):
        assert title in where.subsections, f"{where.name} has no subsection {title!r}"
    missing = [o for o in option_names(command) if not mentions(documentation(path), o)]
    assert not missing, f"{title}: {missing} not documented in {where.name}"


# -- yoi doctor ---------------------------------------------------------------------

@needs_groff
def test_every_doctor_check_is_documented_with_whether_fix_repairs_it():
    from yoi.doctor import CHECKS
    entries = {k: v for k, v in tagged(page(MAN / "yoi-doctor.1").section("CHECKS")).items()
               if re.fullmatch(r"[a-z]+(-[a-z]+)*", k)}
    assert sorted(entries) == sorted(CHECKS)
    for code, (_, fixable) in CHECKS.items():
        text = " ".join(entries[code].split())
        if fixable:
            assert "--fix" in text and "Not fixable" not in text, text
        else:
            assert "Not fixable" in text, text


@needs_groff
def test_every_doctor_check_is_documented_with_its_severity():
    from yoi.doctor import CHECKS, severity
    entries = tagged(page(MAN / "yoi-doctor.1").section("CHECKS"))
    for code in CHECKS:
        first = entries[code].splitlines()[1].strip()
        assert first.startswith("Error." if severity(code) == "error" else "Warning."), \
            (code, first)


# -- yoi(1): exit codes, environment ------------------------------------------------

@needs_groff
def test_the_overview_lists_every_exit_code():
    from yoi import errors
    codes = {0} | {cls.exit_code for cls in vars(errors).values()
                   if isinstance(cls, type) and issubclass(cls, errors.YoiError)}
    documented = tagged(page(ROOT_PAGE).section("EXIT STATUS"))
    assert {str(c) for c in codes} <= set(documented)


@needs_groff
def test_every_environment_variable_the_code_reads_is_documented():
    names = {"YOI_HOME", "YOI_LOCK_TIMEOUT", "YOI_POD", "YOI_FAULT", "XDG_RUNTIME_DIR"}
    for source in (ROOT / "yoi").rglob("*.py"):
        names |= set(re.findall(r"\b(?:YOI|XDG)_[A-Z][A-Z_]*\b", source.read_text()))
    environment = page(ROOT_PAGE).section("ENVIRONMENT")
    missing = sorted(n for n in names if not mentions(environment, n))
    assert not missing, f"not in the ENVIRONMENT of yoi.1: {missing}"


@needs_groff
def test_the_overview_shows_shell_completion_for_each_shell():
    text = page(ROOT_PAGE).section("DESCRIPTION")
    for shell in ("bash", "zsh", "fish"):
        assert f"_YOI_COMPLETE={shell}_source yoi" in text


# -- installation -------------------------------------------------------------------

def test_pip_install_puts_the_pages_where_man_finds_them(tmp_path):
    """`pip install .` installs every page into PREFIX/share/man/man1."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for tree in ("yoi", "man"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip would first uninstall the yoi that runs these tests.
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--ignore-installed", "--no-cache-dir", "--prefix", str(prefix), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    man1 = prefix / "share" / "man" / "man1"
    for path in PAGES:
        assert (man1 / path.name).read_bytes() == path.read_bytes()
    if shutil.which("man"):
        for path in PAGES:
            found = subprocess.run(["man", "-M", str(prefix / "share" / "man"), "-w",
                                    path.name[:-2]], capture_output=True, text=True, timeout=60)
            assert found.stdout.strip() == str(man1 / path.name), found


# -- README ---------------------------------------------------------------------------

README = (ROOT / "README.md").read_text()


def readme_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README, re.M | re.S)


def readme_invocations() -> list[list[str]]:
    """Every `yoi ...` command line in the README's code blocks, as words."""
    found = []
    for block in readme_blocks():
        for line in block.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            segment: list[str] = []
            redirect = False
            for word in words + [";"]:
                if word in ("&&", "||", "|", ";"):
                    if segment and Path(segment[0]).name == "yoi":
                        found.append(["yoi", *segment[1:]])
                    segment = []
                elif word in ("<", ">"):
                    redirect = True  # the next word is a file, not an argument
                elif redirect:
                    redirect = False
                else:
                    segment.append(word)
    return found


def test_readme_quickstart_installs_yoi_and_runs_the_demo_first():
    assert readme_blocks()[0].strip() == \
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/yoi demo"


@needs_groff
def test_readme_commands_and_options_are_the_documented_ones():
    known = synopsis_commands()
    invocations = readme_invocations()
    assert len(invocations) >= 15, invocations
    for words in invocations:
        path = max((c for c in known if tuple(words[:len(c)]) == c), key=len)
        assert not any(c[:len(path)] == path and len(c) > len(path) for c in known), \
            f"README: {' '.join(words)!r} names no documented command"
        doc = documentation(path)
        for word in words[len(path):]:
            if word.startswith("-") and word != "-":
                assert mentions(doc, word.split("=")[0]), \
                    f"README: {word} of {' '.join(path)} is not in its manual"


def test_readme_links_every_manual_and_shows_how_to_read_them():
    for path in MAN.glob("*.1"):
        assert f"(man/{path.name})" in README
    assert "man -l man/yoi.1" in README
    for shell in ("bash", "zsh", "fish"):
        assert f"_YOI_COMPLETE={shell}_source yoi" in README
