"""tools/cli.py: Hydra overrides anywhere on a tool's command line, options and positionals unchanged."""

from __future__ import annotations

import argparse

import pytest

from tools.cli import is_override, parse_with_overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--flag", action="store_true")
    return p


@pytest.mark.parametrize("argv", [
    ["hf/m", "--out", "o", "data=memmap", "data.path=t/", "--k", "3"],
    ["data=memmap", "hf/m", "data.path=t/", "--out", "o", "--k", "3"],
    ["--out", "o", "data=memmap", "--k", "3", "data.path=t/", "hf/m"],
    ["data=memmap", "data.path=t/", "--k=3", "--out=o", "hf/m"],
])
def test_overrides_anywhere(argv: list[str]) -> None:
    args, overrides = parse_with_overrides(parser(), argv)
    assert (args.src, args.out, args.k, args.flag) == ("hf/m", "o", 3, False)
    assert overrides == ["data=memmap", "data.path=t/"]


def test_option_values_that_look_like_overrides_stay_values() -> None:
    args, overrides = parse_with_overrides(parser(), ["src", "--out", "a=b", "+train.x=1", "~logging", "++router.k=1", "--flag"])
    assert args.out == "a=b" and args.flag
    assert overrides == ["+train.x=1", "~logging", "++router.k=1"]


def test_grammar() -> None:
    assert is_override("model.d_model=64") and is_override("router=topk") and is_override("hydra.run.dir=/x/y")
    assert is_override("optim.lr=1e-3,2e-3") and is_override("model@foo=tiny") and is_override("~checkpoint")
    assert not is_override("hf/mixtral") and not is_override("--out=x") and not is_override("x.y") and not is_override("/a=b")


def test_a_missing_positional_is_still_argparse_s_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_with_overrides(parser(), ["--out", "o", "data=memmap"])
    assert "the following arguments are required: src" in capsys.readouterr().err
