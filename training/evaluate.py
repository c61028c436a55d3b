"""Evaluate a HarmoDT model on Meta-World: the ``harmodt-evaluate`` command (see ``--help``).

python training/evaluate.py --model runs/mt10/final --tasks mt10 --episodes 10 --seed 0 --output results.json
"""

from harmodt_hf.evaluation.cli import cli_main, main  # noqa: F401  (main(argv) returns the results)

if __name__ == "__main__":
    cli_main()
