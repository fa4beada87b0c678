"""Run under torchrun by test_scale.py: several gvpo-offline commands in one launch (on the 2-core test machine a
launch's start-up, torch's import and the process group, is a large part of a short command's time).

    python -m torch.distributed.run ... tests/cli_worker.py COMMANDS.json

COMMANDS.json: a list of steps, run in order on every rank: a gvpo-offline command line (``cli.main``: it returns
once every rank has finished, and exits the process on an error), or ``["copy", SRC, DST, IGNORE...]``: rank 0
copies the folder SRC to DST without the names matching the IGNORE patterns, while the other ranks wait."""

import json
import shutil
import sys

import torch

from gvpo_offline import cli
from gvpo_offline.model import distributed


def run_commands(ctx: distributed.Dist, commands: list[list[str]]) -> None:
    for command in commands:
        if command[0] == "copy":
            if ctx.is_main:
                shutil.copytree(command[1], command[2], ignore=shutil.ignore_patterns(*command[3:]))
            distributed.barrier(ctx)
        else:
            cli.main(command)


if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        run_commands(distributed.context("cpu"), json.load(f))
