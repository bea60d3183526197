"""The README's commands that run on a CPU without a download, run as written: they must work."""

import re
import shlex

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

# Configs that need nothing but the package (the built-in tiny model and the shipped sample).
CPU_CONFIGS = {"configs/demo.yaml", "configs/patch_sample.yaml", "configs/classify_sample.yaml"}


def readme_commands() -> list[str]:
    """Each `ttc ...` command of the README's bash blocks (one part of an `&&` chain each), comments removed."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            for part in line.split("&&"):
                part = part.split("  #")[0].strip()
                if part.startswith("ttc "):
                    commands.append(part)
    return commands


def runs_on_cpu(command: str) -> bool:
    args = shlex.split(command)
    configs = {b for a, b in zip(args, args[1:], strict=False) if a == "--config"}
    needs_files = any(a in ("--ckpt_path", "--file") for a in args) or "prompts/" in command
    return not needs_files and (configs <= CPU_CONFIGS) and (bool(configs) or "--model.help" in args)


COMMANDS = [c for c in readme_commands() if runs_on_cpu(c)]


def test_the_readme_has_commands_that_run_on_a_cpu():
    assert len(COMMANDS) >= 5, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_runs_as_written(run_ttc, tmp_path, command):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    code, _, err = run_ttc(*shlex.split(command)[1:])
    assert code == 0, err
