"""Every command and option of the `featcache` and `heads` apps is used by at least one test (issue 20).

The commands and options are read from the typer apps themselves (typer.main.get_command: click commands and
their params), so a new option is listed the moment it exists. An option counts as tested when some test source
has a call or a list literal holding both the command's name and the option (either side of a --x/--no-x flag),
e.g. `runner.invoke(heads_app, ["train", "--cache", c, "--tune-bias"])` or `heads_cli("show", run)`; a
command with no options counts when its name appears in such a literal. Whether the test then checks the output's
content is for review, not for this guard.

    python tests/test_cli_coverage.py      # prints every command / option and where it is used
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli import featcache_app, heads_app  # noqa: E402  (run as a script too)

# (app, command, option) that no test here can exercise, each with the reason; an entry is a promise that the
# option is tested some other way. Empty today: every option has a test (the --device options with "cpu"; their
# CUDA values run on a GPU only, bench/gpu_smoke.sh).
ALLOWED_UNTESTED: dict[tuple[str, str, str], str] = {}
PROGRAMS = ("featcache", "heads", "featcache_app", "heads_app")  # program names (or apps) before the command


def cli_options() -> dict[tuple[str, str], list[str]]:
    """(app, command) -> every option of it (its --x and --no-x names), and (app, "") -> the app's own options."""
    out = {}
    for prog, app in (("featcache", featcache_app), ("heads", heads_app)):
        group = typer.main.get_command(app)
        out[(prog, "")] = _names(group.params)
        for name, cmd in group.commands.items():
            out[(prog, name)] = _names(cmd.params)
    return out


def _names(params) -> list[str]:
    names = []
    for p in params:
        if p.param_type_name == "option":  # typer's own click (typer._click): not click.Option instances
            names.append("/".join(p.opts + p.secondary_opts))
    return names


def _head(words: list[str]) -> str | None:
    """The command of a command line's strings: the first word past app options and program names."""
    return next((w for w in words if not w.startswith("-") and w not in PROGRAMS), None)


def _strings(node: ast.AST) -> list[str]:
    consts = sorted((n.lineno, n.col_offset, n.value) for n in ast.walk(node)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return [v for *_, v in consts]


def _invocations(path: Path) -> list[tuple[str, set[str]]]:
    """(command, its strings) of every call and list/tuple literal of a test source whose strings, in source
    order, start with the command's name; and calls of a helper that prepends a fixed command to its *args
    (`def report(*args): return runner.invoke(heads_app, ["report", *args])`, or `cli("extract", ..., *args)`)."""
    tree = ast.parse(path.read_text(), str(path))
    helpers = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                elts = node.elts if isinstance(node, ast.List) else node.args if isinstance(node, ast.Call) else []
                if elts and isinstance(elts[0], ast.Constant) and isinstance(elts[0].value, str) \
                        and any(isinstance(e, ast.Starred) for e in elts):
                    helpers[fn.name] = elts[0].value
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Call, ast.List, ast.Tuple)):
            words = _strings(node)
            head = _head(words)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers:
                head = helpers[node.func.id]
            if head is not None:
                found.append((head, set(words)))
    return found


def usage() -> dict[tuple[str, str, str], list[str]]:
    """(app, command, option) -> the test files that use it ("" option: the command itself; "" command: the
    app's own options, given before any command)."""
    files = {p.name: _invocations(p) for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name}
    out = {}
    for (prog, command), options in cli_options().items():
        for option in [""] + options:
            names = option.split("/") if option else []
            out[(prog, command, option)] = [
                name for name, calls in files.items()
                if any((not command or head == command) and (not names or any(n in words for n in names))
                       for head, words in calls)]
    return out


def test_every_command_and_option_is_used_by_a_test():
    missing = [f"{prog} {command} {option}".strip() for (prog, command, option), where in usage().items()
               if not where and (command or option) and (prog, command, option) not in ALLOWED_UNTESTED]
    assert not missing, ("CLI options no test uses (add an end-to-end CliRunner test checking the output, or an "
                         "ALLOWED_UNTESTED entry with the reason):\n" + "\n".join(missing))


def test_the_guard_sees_options(tmp_path):
    """Not vacuous: the apps' options are listed, and invocations are read as the command with its options."""
    opts = cli_options()
    assert "--tune-bias/--no-tune-bias" in opts[("heads", "train")] and "--debug" in opts[("heads", "")]
    assert "--progress/--no-progress" in opts[("featcache", "extract")] and opts[("heads", "fusions")] == []
    src = tmp_path / "test_planted.py"
    src.write_text("def report(*args):\n    return CliRunner().invoke(heads_app, ['report', *args])\n\n"
                   "def test_x(c, d):\n    CliRunner().invoke(heads_app, ['--debug', 'train', '--cache', c])\n"
                   "    report(d, '--group-by', 'fusion')\n")
    calls = _invocations(src)
    assert ("train", {"--debug", "train", "--cache"}) in calls and ("report", {"--group-by", "fusion"}) in calls
    assert not any(head == "train" and "--tune-bias" in words for head, words in calls)


if __name__ == "__main__":
    for (prog, command, option), where in usage().items():
        print(f"{prog:9} {command or '(app)':16} {option or '(command)':36} {', '.join(where) or 'NOT USED'}")
