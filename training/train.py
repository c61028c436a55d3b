"""Train HarmoDT (or a baseline) on a Meta-World episode dataset; ``python training/train.py --help`` lists the options.

    accelerate launch training/train.py --config harmodt_hf/configs/tiny.yaml --dataset data/mt5
    torchrun --nproc_per_node 2 training/train.py --config harmodt_hf/configs/paper/harmodt-f_mt10-near-optimal.yaml ...
    python training/train.py --config harmodt_hf/configs/adapt.yaml --adapt_from runs/tiny/final --dataset data/new

Every field of ModelArguments, DataArguments and HarmoDTTrainingArguments (harmodt_hf) can be set in the YAML file
given by --config or on the command line (which wins). The final model folder is <output_dir>/final. A config with
``adapt_from`` (e.g. harmodt_hf/configs/adapt.yaml) adapts a trained model to new tasks instead (few-shot, issue #19:
harmodt_hf.training.adapt_cli).
"""

from harmodt_hf.training.adapt_cli import cli_main

if __name__ == "__main__":
    cli_main()
