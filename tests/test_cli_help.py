"""Every example command line in every command's --help parses as written (so it runs when copied), and `-h`
works for the app and every command. Nothing is executed: each line is parsed into its command's context."""

import re
import shlex

import pytest
import typer.main
from typer.testing import CliRunner

from modsquad.cli import app
from modsquad.config import load_config, resolve_config

#: a help line that is an example: "modsquad ..." or "torchrun ...", alone or after a label ("Example: ")
EXAMPLE = re.compile(r"^(?:[A-Z][^:`]*:\s+)?((?:modsquad|torchrun)\s.+)$")


def _commands(cmd=None, path=()):
    """(path, click command) of the app, its groups and every command."""
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        if not sub.hidden:
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands())


def _examples() -> list[tuple[str, str]]:
    out = []
    for path, cmd in COMMANDS:
        for line in (cmd.help or "").splitlines():
            match = EXAMPLE.match(line.strip())
            if match:
                out.append((" ".join(path) or "modsquad", match.group(1)))
    return out


EXAMPLES = _examples()


def _parse(argv: list[str]):
    """The context of the command `modsquad argv` names, with every option and argument parsed and converted
    (raises the usage error that the shell user would see)."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("modsquad", list(argv))
    while hasattr(cmd, "resolve_command"):
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def _argv(line: str) -> list[str]:
    words = shlex.split(line)
    if words[0] == "torchrun":
        assert "--no-python" in words, line
        words = words[words.index("modsquad"):]
    assert words[0] == "modsquad", line
    return words[1:]


def test_every_command_has_an_example():
    described = {where.split()[-1] if " " in where else where for where, _ in EXAMPLES}
    missing = [" ".join(p) for p, cmd in COMMANDS if p and not hasattr(cmd, "commands") and p[-1] not in described]
    assert not missing, f"commands without an Example in --help: {missing}"


@pytest.mark.parametrize("where, line", EXAMPLES, ids=[f"{w}:{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_help_example_parses_as_written(where, line):
    assert not line.rstrip().endswith("."), f"{where}: trailing full stop in {line!r}"
    ctx = _parse(_argv(line))
    config = ctx.params.get("config")
    if config is not None:
        resolve_config(config)  # packaged names resolve from any folder


def test_add_task_example_adds_a_task_the_example_run_lacks():
    """The --from RUN of an add-tasks example is the run another example trains; the added task is new to it."""
    made = {}
    for _, line in EXAMPLES:
        params = _parse(_argv(line)).params
        if params.get("config") is not None and params.get("out") is not None:
            made[str(params["out"])] = set(load_config(params["config"]).model.tasks)
    adding = [_parse(_argv(line)).params for _, line in EXAMPLES if "--add-tasks" in line]
    assert adding
    for params in adding:
        assert str(params["from_run"]) in made, params
        new = {t.strip() for t in params["add_tasks"].split(",")}
        assert not new & made[str(params["from_run"])], (new, made[str(params["from_run"])])


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "app")
def test_short_help_option(path):
    result = CliRunner().invoke(app, [*path, "-h"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


def test_boolean_flags_have_a_negative_form():
    """`--x/--no-x`, so that a flag set in a script or alias can be switched off again."""
    lonely = []
    for path, cmd in COMMANDS:
        for param in getattr(cmd, "params", []):
            if getattr(param, "is_flag", False) and not param.is_eager and not param.secondary_opts:
                lonely.append(f"{' '.join(path)} {param.opts[0]}")
    assert not lonely, lonely
