"""Run under ``torchrun --nproc_per_node 2`` by test_bf16_resume.py: ``gvpo-offline train`` on each WORKDIR in
turn, in one launch (one process group), the first from step 0 and the others with --resume:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/bf16_resume_worker.py "TRAIN OPTIONS" \
        WORKDIR [RESUMED_WORKDIR ...]
"""

import sys

import torch

from gvpo_offline import cli

torch.set_num_threads(1)
options, first, resumed = sys.argv[1].split(), sys.argv[2], sys.argv[3:]
cli.main(["train", "--workdir", first, *options])
for workdir in resumed:
    cli.main(["train", "--workdir", workdir, *options, "--resume"])
