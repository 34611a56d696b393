"""Pretrain a (Mixture-of-Experts) GPT model with Megatron-LM's flags: torchrun --nproc-per-node N pretrain_gpt.py ...
(or srun python pretrain_gpt.py ... under SLURM). `python pretrain_gpt.py --help` lists the flags by subsystem."""

import sys

from megamoe.parallel.world import exit_process
from megamoe.training.loop import pretrain

if __name__ == "__main__":
    try:
        code = pretrain()
    except (ValueError, FileNotFoundError) as err:  # bad input: the same message on every rank, before any collective
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    exit_process(code)
