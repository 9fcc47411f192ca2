"""The front door: `flexmerge demo` as the README words it, every `flexmerge ...` line of the docs
parses with the CLI, and optional dependencies are declared and named when missing."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flexmerge.cli import app
from flexmerge.errors import FlexMergeError
from flexmerge.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
runner = CliRunner()


# -- flexmerge demo, no options --------------------------------------------------------------

class _CutShort(FlexMergeError):
    pass


def test_demo_without_options_builds_the_wordnet_zoo(monkeypatch, tmp_path):
    """`flexmerge demo` resolves the wordnet suite and enters its zoo builder (cut short here)."""
    from flexmerge.suites.wordnet import WordNetSuite

    entered = []

    def build(self, directory):
        entered.append((self.name, directory))
        raise _CutShort("training cut short by the test")

    monkeypatch.setattr(WordNetSuite, "build", build)
    monkeypatch.setenv("FLEXMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["demo"])
    assert r.exit_code == 2 and "training cut short by the test" in r.output, r.output
    assert "unknown suite" not in r.output
    assert "building the 'wordnet' zoo" in r.output.replace("\n", "")
    assert [name for name, _ in entered] == ["wordnet"]
    assert Path(entered[0][1]).is_relative_to(tmp_path / "cache")


# -- every flexmerge command line in the docs parses ----------------------------------------

def _code_blocks(text: str):
    """(language, lines) of each fenced code block of a Markdown text."""
    lang, lines = None, []
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, lines = fence.group(1).lower(), []
        elif fence:
            yield lang, lines
            lang = None
        elif lang is not None:
            lines.append(line)


def _shell_commands(lines: list[str]) -> list[str]:
    """The commands of a shell block: joined continuation lines; where the block shows prompts
    (`$ `), only the prompted lines (the rest is output)."""
    prompted = any(line.lstrip().startswith("$ ") for line in lines)
    commands, current, continuing = [], "", False
    for line in lines:
        stripped = line.strip()
        if not continuing:
            if prompted and not stripped.startswith("$ "):
                continue
            stripped = stripped[2:] if stripped.startswith("$ ") else stripped
        current += " " + stripped
        continuing = stripped.endswith("\\")
        if continuing:
            current = current[:-1]
        else:
            commands.append(current.strip())
            current = ""
    return commands


def _flexmerge_argv(command: str) -> list[list[str]]:
    """The argument lists of the `flexmerge` invocations in one shell command line."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return []
    out, segment = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|", "&"):
            while segment and re.fullmatch(r"[A-Z_]+=\S*", segment[0]):  # FOO=1 flexmerge ...
                segment.pop(0)
            if segment[:1] == ["flexmerge"]:
                out.append([w for w in segment[1:] if w != "..."])  # `...`: arguments the text elides
            elif segment[:3] == ["python", "-m", "flexmerge"]:
                out.append([w for w in segment[3:] if w != "..."])
            segment = []
        else:
            segment.append(word)
    return out


def documented_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for lang, lines in _code_blocks(doc.read_text(encoding="utf-8")):
            if lang not in SHELL_LANGS:
                continue
            for command in _shell_commands(lines):
                found += [(f"{doc.name}: {command}", argv) for argv in _flexmerge_argv(command)]
    return found


def parse_only(argv: list[str]) -> None:
    """Parse `flexmerge ARGV` as the CLI would, down to the command's options, and run nothing:
    the command tree is built afresh and every command's body replaced by a no-op."""
    import typer.main

    def silence(command) -> None:
        for sub in getattr(command, "commands", {}).values():
            silence(sub)
        if not hasattr(command, "commands"):
            command.callback = lambda **_: None

    root = typer.main.get_command(app)
    silence(root)
    root.main(list(argv), prog_name="flexmerge", standalone_mode=False)


def test_docs_hold_flexmerge_commands():
    invocations = documented_invocations()
    assert len(invocations) >= 15, "the extractor lost the docs' command lines"
    assert any(argv == ["demo"] for _, argv in invocations)  # the README's main command


@pytest.mark.parametrize("where, argv", documented_invocations(), ids=lambda x: x if isinstance(x, str) else "")
def test_documented_command_line_parses(where, argv):
    try:
        parse_only(argv)
    except Exception as e:  # click's UsageError / BadParameter: the docs and the CLI drifted apart
        pytest.fail(f"{where}\n  does not parse: {type(e).__name__}: {getattr(e, 'message', e)}")


def test_parse_only_rejects_a_drifted_command_line():
    with pytest.raises(Exception, match="No such option"):
        parse_only(["merge", "--out", "x", "--sizes", "2"])
    with pytest.raises(Exception, match="No such command"):
        parse_only(["mrege"])
    parse_only(["route", "train", "flex", "--suite", "wordnet"])


# -- optional dependencies -------------------------------------------------------------------

def _declared(extra: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    return " ".join(deps).lower()


# the distribution that brings each module flexmerge imports from an extra
DISTRIBUTIONS = {"transformers": "transformers", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
                 "fastapi": "fastapi", "uvicorn": "uvicorn", "ray": "ray", "tokenizers": "tokenizers", "peft": "peft"}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_declares_its_modules(extra):
    for module in EXTRAS[extra]:
        assert DISTRIBUTIONS[module] in _declared(extra), f"{module} is not declared in the '{extra}' extra"


def _without(monkeypatch, *modules: str) -> None:
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` raises ModuleNotFoundError


@pytest.mark.parametrize("argv, missing, extra", [
    (["serve", "flex"], "fastapi", "serve"),
    (["demo", "--suite", "digits"], "sklearn", "suites"),
    (["sweep", "--suite", "digits", "--sizes", "1"], "matplotlib", "suites"),
])
def test_a_missing_extra_is_one_line_and_exit_2(monkeypatch, tmp_path, argv, missing, extra):
    _without(monkeypatch, missing)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert f"pip install 'flexmerge[{extra}]'" in r.output and missing in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_a_missing_optional_module_deep_in_a_command_names_its_extra(monkeypatch, capsys):
    """An import that fails inside a command, not at its start, still names the extra; any other
    missing module is an internal error (a bug), exit 1."""
    from flexmerge import cli

    _without(monkeypatch, "ray", "not_a_dependency")

    @cli.guarded
    def needs_ray():
        import ray  # noqa: F401

    @cli.guarded
    def has_a_bug():
        import not_a_dependency  # noqa: F401

    with pytest.raises(typer.Exit) as exit_info:
        needs_ray()
    assert exit_info.value.exit_code == 2
    with pytest.raises(typer.Exit) as exit_info:
        has_a_bug()
    assert exit_info.value.exit_code == 1
    said = capsys.readouterr().err
    assert "pip install 'flexmerge[ray]'" in said and "internal error" in said


def test_the_version_is_the_distributions():
    import flexmerge

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert flexmerge.__version__ == declared
