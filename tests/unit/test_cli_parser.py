"""The command line is built for the command named alone: the same options, help
and parse as the whole command line's."""

from __future__ import annotations

import argparse

import pytest

from minidriver.cli.parser import build_parser, named_command, parse_args


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_each_command_built_alone_is_the_one_of_the_whole_command_line() -> None:
    whole = commands(build_parser())
    assert len(whole) > 30
    for name, parser in whole.items():
        alone = commands(build_parser(name))
        assert list(alone) == [name]
        assert alone[name].format_help() == parser.format_help(), name


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["boot", "--image", "x"], "boot"),
        (["--json", "list"], "list"),
        (["--config", "boot", "list"], "list"),  # a config file named boot
        (["--state-dir=/s", "show", "a"], "show"),
        (["--conf", "f", "--connect", "test:///default", "image", "list"], "image"),
        (["--debug"], None),
        (["--", "boot"], None),
        ([], None),
    ],
)
def test_the_command_named_is_found_past_the_global_options(
    argv: list[str], named: str | None
) -> None:
    assert named_command(argv) == named


def test_global_options_before_and_after_the_command_parse_as_before() -> None:
    args = parse_args(["--config", "boot", "--json", "show", "vm1", "--state-dir", "/s"])
    assert (args.command, args.instance, args.config, args.json, args.state_dir) == (
        "show",
        "vm1",
        "boot",
        True,
        "/s",
    )


def test_a_word_that_names_no_command_is_refused_with_every_command_listed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err
    assert "'boot'" in err
    assert "'volume'" in err
