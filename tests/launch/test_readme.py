"""The README works for a newcomer: commands run inside the environment, and it points only at files that exist."""

from __future__ import annotations

import re

from tests.launch.test_train import REPO

README = (REPO / "README.md").read_text()
TOOLS = ("python", "python3", "torchrun", "pytest", "wandb")


def command_lines() -> list[tuple[int, str]]:
    """(line number, command) for every command line of every fenced block (``$ `` prompts stripped)."""
    out, fenced = [], False
    for number, line in enumerate(README.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced and line.strip():
            out.append((number, line.strip().removeprefix("$ ")))
    return out


def program(command: str) -> str:
    """The program a shell line runs, after its ``VAR=value`` assignments."""
    words = [w for w in command.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    return words[0] if words else ""


def test_every_command_runs_inside_the_environment() -> None:
    activate = next(n for n, c in command_lines() if c.startswith("source .venv/bin/activate"))
    bare = [(n, c) for n, c in command_lines() if program(c) in TOOLS and n < activate]
    assert bare == []  # before the activation step, every command names .venv/bin/ explicitly
    first_use = min(n for n, c in command_lines() if ".venv/bin/python -m" in c)
    assert first_use < activate  # the two commands at the top come first and work from a fresh clone
    own = README[README.index("### Checkpoints and resume"):README.index("## Benchmarks")]
    assert not re.search(r"^(\$ )?(\w+=\S+ )*(python|torchrun) ", own, flags=re.M)  # the run/torchrun sections spell it out


def test_readme_refers_only_to_files_in_the_repo() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert target.startswith("http") or (REPO / target).exists(), target
    for path in re.findall(r"`((?:launch|tools|tests|conf|docs|moe|parallel|kernels)/[\w./-]+\.(?:py|sh|sbatch|md|yaml))`", README):
        assert (REPO / path).exists(), path
    assert "shared/" not in README
