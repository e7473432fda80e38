"""The ``cmscale`` command: every subcommand's --help ends with an example of itself, and the
same thing has the same flag name everywhere."""

import pytest

from cmscale import cli

# The flags each command must take (where it has that thing at all).
FLAGS = {
    "train": [], "sample": ["--checkpoint", "--ema", "--num", "--out"], "edit": [],
    "export": ["--checkpoint", "--ema", "--out"], "convert": ["--out"],
    "make-shards": ["--out", "--num"], "ref-stats": ["--out", "--num"],
    "fid-report": ["--checkpoint", "--ema", "--num", "--out"],
    "compare": ["--checkpoint", "--num", "--out"],
}


def test_every_command_is_listed():
    assert sorted(FLAGS) == sorted(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_has_an_example_and_the_shared_flags(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"example: cmscale {command} " in text
    for flag in FLAGS[command]:
        assert f"{flag} " in text or f"{flag}," in text, flag


def test_edit_tasks_share_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["edit", "inpaint", "--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--ema", "--num", "--out"):
        assert flag in text


def test_unknown_command_lists_them_all(capsys):
    assert cli.main(["nope"]) == 2
    text = capsys.readouterr().out
    assert all(name in text for name in cli.COMMANDS)


def test_output_given_twice_differently_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["make-shards", "sklearn:digits", str(tmp_path / "a"), "--out",
                  str(tmp_path / "b"), "--resolution", "8"])
    assert e.value.code == 2 and "two outputs" in capsys.readouterr().err
