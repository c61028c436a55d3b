"""Train HarmoDT (or a baseline) on a Meta-World episode dataset.

    accelerate launch training/train.py --config training/configs/tiny.yaml --dataset data/mt5
    torchrun --nproc_per_node 2 training/train.py --config training/configs/harmodt-f_mt10_near.yaml --dataset ...

Every field of ModelArguments, DataArguments and HarmoDTTrainingArguments (harmodt_hf) can be set in the YAML file
given by --config or on the command line (which wins). The final model folder is <output_dir>/final.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from harmodt_hf.training.cli import main

if __name__ == "__main__":
    try:
        final = main(sys.argv[1:])
        print(f"Model saved to {final}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
