"""Train HarmoDT (or a baseline) on a Meta-World episode dataset; ``python training/train.py --help`` lists the options.

    accelerate launch training/train.py --config harmodt_hf/configs/tiny.yaml --dataset data/mt5
    torchrun --nproc_per_node 2 training/train.py --config harmodt_hf/configs/paper/harmodt-f_mt10-near-optimal.yaml ...

Every field of ModelArguments, DataArguments and HarmoDTTrainingArguments (harmodt_hf) can be set in the YAML file
given by --config or on the command line (which wins). The final model folder is <output_dir>/final.
"""

from harmodt_hf.training.cli import cli_main

if __name__ == "__main__":
    cli_main()
