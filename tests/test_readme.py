"""The README opens with the two set-up commands, and CI runs exactly the second one."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README must open with a sh code block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "pip install -e ." in commands[0] and "dssefs mount" in commands[0]
    assert "pytest" in commands[1] and "'.[test]'" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    body = [line for line in ci if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert body == [_readme_commands()[1]]
