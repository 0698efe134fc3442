"""One error policy for every command: a user's mistake is one paragraph and exit 2 (its traceback only with
--debug); an unexpected exception is a bug: its traceback, a line saying so, exit 1."""
from __future__ import annotations

from typer.testing import CliRunner

import cli


def _invoke(app, args, **kw):
    return CliRunner().invoke(app, args, **kw)


def test_user_mistake_is_one_paragraph_without_traceback(tmp_path):
    r = _invoke(cli.heads_app, ["show", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    r = _invoke(cli.featcache_app, ["info", str(tmp_path / "missing.h5")])
    assert r.exit_code == 2 and "missing.h5 does not exist" in " ".join(r.output.split())
    assert "Traceback" not in r.output


def test_debug_shows_the_traceback_behind_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(cli._State, "debug", False)
    r = _invoke(cli.featcache_app, ["--debug", "info", str(tmp_path / "missing.h5")])
    assert r.exit_code == 2 and "Traceback" in r.output and "missing.h5 does not exist" in " ".join(r.output.split())


def test_a_bug_prints_its_traceback_and_says_so(tmp_path, monkeypatch):
    import featcache.info

    def broken(path):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(featcache.info, "print_info", broken)
    r = _invoke(cli.featcache_app, ["info", str(tmp_path / "x.h5")])
    assert r.exit_code == 1
    assert "Traceback" in r.output and "RuntimeError: an invariant broke" in r.output
    assert "This is a bug in featcache-heads" in r.output


def test_a_key_error_is_a_bug_not_a_message(monkeypatch):
    """KeyError used to be shown as a one-line message; it is never a user's mistake, so it is a bug now."""
    import heads.report.build

    monkeypatch.setattr(heads.report.build, "write_reports", lambda *a, **k: {}["missing"])
    r = _invoke(cli.heads_app, ["report", "."])
    assert r.exit_code == 1 and "KeyError" in r.output and "This is a bug" in r.output


def test_every_command_goes_through_the_policy():
    for app in (cli.featcache_app, cli.heads_app):
        for c in app.registered_commands:
            assert c.callback.__wrapped__ is not None, c.name  # functools.wraps of cli.command
