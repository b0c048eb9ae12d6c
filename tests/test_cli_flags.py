"""One flag name per idea across commands; the old spellings still work but are hidden from --help."""

import re

import pytest
from typer.testing import CliRunner

from modsquad.cli import app

NEW = {"bench": ["--data-root", "--batch-size", "--tasks", "--device"], "usage": ["--data-root", "--batch-size"],
       "extract": ["--data-root", "--tasks", "--batch-size"], "predict": ["--tasks", "--batch-size"],
       "eval": ["--data-root", "--batch-size"]}
OLD = {"bench": ["--data", "--batch"], "usage": ["--data"], "extract": ["--data"], "predict": ["--task"]}


@pytest.mark.parametrize("command", sorted(NEW))
def test_help_shows_the_one_name(command):
    text = re.sub(r"\x1b\[[0-9;]*m", "", CliRunner().invoke(app, [command, "--help"], terminal_width=200).output)
    flags = set(re.findall(r"--[a-z][a-z-]*", text))
    assert set(NEW[command]) <= flags
    assert not set(OLD.get(command, [])) & flags


def test_old_and_new_spelling_together_is_an_error(tmp_path):
    result = CliRunner().invoke(app, ["usage", str(tmp_path), "--data", str(tmp_path), "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "old name" in result.output
