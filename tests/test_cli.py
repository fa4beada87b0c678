"""The command line itself: usage errors, --help text."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

COMMANDS = ("sample", "precompute-ref", "train", "eval", "inspect", "convert", "plot")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Usage: gvpo-offline"),  # no arguments: the help, as a usage error
        (["train"], "Missing option '--beta'"),
        (["precompute-ref", "data.jsonl"], "Missing option '--model'"),
        (["train", "--beta", "0.1", "--no-such-option"], "No such option: --no-such-option"),
        (["train", "--beta", "abc"], "'--beta'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(run_cli, args, message):
    result = run_cli(*args)
    assert result.code == 2
    text = result.out + result.err
    assert message in text
    assert "Usage: gvpo-offline" in text
    assert "Traceback" not in text


def test_usage_error_from_the_installed_entry_point():
    """The real process: exit status 2 and a usage message, no traceback (python -m = the console script)."""
    proc = subprocess.run([sys.executable, "-m", "gvpo_offline", "train", "--beta", "abc"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Usage: gvpo-offline train" in proc.stderr and "'--beta'" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def _help(run_cli, *args) -> str:
    result = run_cli(*args, "--help")
    assert result.code == 0
    return " ".join((result.out + result.err).split())  # unwrapped, so phrases can be matched


@pytest.mark.parametrize("command", COMMANDS)
def test_help_keeps_bracketed_text_and_shows_no_type_tags(run_cli, command):
    text = _help(run_cli, command)
    assert not re.search(r"<(list|str|int|float|bool)\b", text), text
    assert "[required]" in text if command == "convert" else "[default:" in text  # not eaten as rich markup
    if command == "precompute-ref":
        assert "[default: 16384 on GPU, 2048 on CPU]" in text  # bracketed text in our own help


def test_top_level_help_lists_the_commands(run_cli):
    text = _help(run_cli)
    assert all(command in text for command in COMMANDS)
    assert "<bool>" not in text


def test_train_help_explains_lr_beta_and_grad_norm(run_cli):
    text = _help(run_cli, "train")
    assert "|g| in the log is the norm before clipping" in text
    assert "pick β on the scale of the reward differences" in text
    assert "(m/(2n))× ours per step" in text and "AdamW a constant factor mostly cancels" in text
    assert "scales the loss by 1/2" not in text
