"""The README's commands run, and the README's and docs' links and paths resolve.

Commands are the ``npquant ...`` lines of README.md's fenced ``bash`` blocks
(and the ``$ npquant ...`` lines of its ``console`` blocks, which show
output). Fast: each subcommand's ``--help`` exits 0 and lists every option
the README and docs use with it; ``npquant schemes`` and ``npquant demo``
run. Slow: every README command runs, in order, in one directory (so
``inspect`` finds what ``quantize`` wrote and ``quantize --plan`` the plan),
GPTQ and planning on 16 calibration texts; and the README's Python block
runs.

Links: every relative link of README.md and docs/*.md points at a file that
exists (and a heading that exists, where it names one), every repository
path they name exists, and none names a path outside the repository.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

#: The subcommands the README must show with an example.
DOCUMENTED = ("demo", "schemes", "report", "quantize", "eval", "plan", "convert")
#: Subcommands cheap enough to run in the fast suite (under a second each).
CHEAP = ("schemes", "demo")
#: Calibration texts for the slow run of GPTQ and planning commands (the README's use 616 and 128).
FEW_SAMPLES = "16"
#: Candidate schemes for the slow run of ``npquant plan`` (its default is six): the same code path, a third of the work.
FEW_SCHEMES = "w4-g128,w8-channel"
#: Seconds one README command may take in the slow run.
COMMAND_TIMEOUT = 900

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"(?<![\w./-])((?:src|tests|benchmarks|docs)/[\w./-]*\w)")
_SEPARATORS = {"&&", "||", ";", "|"}


def _blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced code block."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def _commands(path: Path) -> list[tuple[str, ...]]:
    """Each ``npquant ...`` command of ``path``'s bash and console blocks, as argument tuples, in order."""
    commands = []
    for lang, body in _blocks(path.read_text(encoding="utf-8")):
        if lang == "bash":
            lines = body.splitlines()
        elif lang == "console":
            lines = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        else:
            continue
        for line in lines:
            segment: list[str] = []
            for token in [*shlex.split(line, comments=True), ";"]:
                if token in _SEPARATORS:
                    if segment[:1] == ["npquant"]:
                        commands.append(tuple(segment))
                    segment = []
                else:
                    segment.append(token)
    return commands


def _run(args, cwd, timeout=120) -> subprocess.CompletedProcess:
    """``npquant args`` through this interpreter (``python -m npquant``), output captured."""
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "npquant", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _explain(cmd, result) -> str:
    return f"{shlex.join(cmd)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


README_COMMANDS = _commands(README)
ALL_COMMANDS = [cmd for page in PAGES for cmd in _commands(page)]


def _subcommand(cmd: tuple[str, ...]) -> str:
    return next((t for t in cmd[1:] if not t.startswith("-")), "")


# --- commands -------------------------------------------------------------------------------
def test_the_readme_shows_every_command():
    shown = {_subcommand(cmd) for cmd in README_COMMANDS}
    missing = [c for c in DOCUMENTED if c not in shown]
    assert not missing, f"README.md has no example of: {', '.join(missing)}"


@pytest.mark.parametrize("sub", sorted({_subcommand(cmd) for cmd in ALL_COMMANDS}))
def test_each_subcommand_has_the_options_the_docs_use(sub, tmp_path):
    result = _run([sub, "--help"], tmp_path)
    assert result.returncode == 0, _explain(("npquant", sub, "--help"), result)
    used = sorted({t.split("=")[0] for cmd in ALL_COMMANDS if _subcommand(cmd) == sub for t in cmd
                   if t.startswith("-")})
    unknown = [opt for opt in used if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", result.stdout)]
    assert not unknown, f"npquant {sub} --help lists no {', '.join(unknown)}, which the docs use"


@pytest.mark.parametrize("cmd", [c for c in README_COMMANDS if _subcommand(c) in CHEAP], ids=shlex.join)
def test_cheap_readme_commands_run(cmd, tmp_path):
    result = _run(cmd[1:], tmp_path)
    assert result.returncode == 0, _explain(cmd, result)
    assert result.stdout.strip(), f"{shlex.join(cmd)} printed nothing"


def _lighter(cmd: tuple[str, ...]) -> tuple[str, ...]:
    """The command with less calibration work: GPTQ and planning on FEW_SAMPLES texts, a plan over FEW_SCHEMES.

    The same code paths run; a plan over all six candidates measures 216 layer costs, minutes on 2 cores.
    """
    if _subcommand(cmd) == "plan" and "--schemes" not in cmd:
        cmd += ("--schemes", FEW_SCHEMES)
    calibrates = (_subcommand(cmd) == "plan" or any(t in ("gptq", "awq", "awq+gptq") for t in cmd) or "--plan" in cmd
                  or "--smooth" in cmd)
    return cmd + ("--max-samples", FEW_SAMPLES) if calibrates and "--max-samples" not in cmd else cmd


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    failures = []
    for cmd in dict.fromkeys(README_COMMANDS):  # each once, in order
        cmd = _lighter(cmd)
        result = _run(cmd[1:], tmp_path, timeout=COMMAND_TIMEOUT)
        if result.returncode != 0:
            failures.append(_explain(cmd, result))
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_the_readme_python_block_runs(tmp_path):
    blocks = [body for lang, body in _blocks(README.read_text(encoding="utf-8")) if lang == "python"]
    assert blocks, "README.md has no python block"
    for body in blocks:
        result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT)
        assert result.returncode == 0, f"README.md's python block failed:\n{result.stderr[-3000:]}"


# --- links and paths -------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def _prose(path: Path) -> str:
    """``path``'s text without its fenced code blocks."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(page):
    broken = []
    for target in _LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_exist(page):
    named = set(_REPO_PATH.findall(page.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_outside_the_repository(page):
    lines = [f"{n}: {line}" for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             if "shared/" in line]
    assert not lines, f"{page.relative_to(ROOT)} names shared/, which is not in the repository:\n" + "\n".join(lines)


def test_the_docs_are_there():
    assert DOCS, "docs/*.md is missing"
    assert README_COMMANDS, "README.md has no npquant command in a bash block"
