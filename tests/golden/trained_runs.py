"""Golden record of a few short training runs (several mask updates each): mask hash after every update and a digest
of the trained weights, per mask rule. Checked by tests/test_trained_runs_unchanged.py.

Recorded at the commit the training renovation (issue #16) started from, so that the renovation shows "behaviour
unchanged": the same masks after every update and the same trained weights, for every rule (regenerated once since,
when the model renovation changed the masked linear's summation order: masks identical, losses within 1.2e-7).
Regenerate only when the training arithmetic is *meant* to change, and say why in the commit message:

    cd <repo> && PYTHONPATH=$PWD python tests/golden/trained_runs.py          # writes trained_runs.json
    cd <repo> && PYTHONPATH=$PWD python tests/golden/trained_runs.py --check  # compares only

Weights are compared bit for bit (SHA-256 of every tensor) on the platform that recorded them (same torch version and
CPU capability); elsewhere kernels may round differently, so the per-tensor sums are compared within a tolerance and
the mask hashes exactly (the selection has no near-ties here, see ``golden.json``'s README).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from golden.regenerate import seed_by_name  # noqa: E402
from helpers import synthetic_trainer  # noqa: E402

RECORD_FILE = Path(__file__).with_name("trained_runs.json")
LOSS_RTOL = 1e-5  # logged losses on another platform (float rounding)
# Per-tensor sums on another platform. Loose on purpose: the attention's key biases get no true gradient (softmax
# ignores a shift shared by all keys), so AdamW turns rounding noise in their gradients into full-size steps: a
# 1e-7 change of the losses moved those sums by up to 7e-4 of their value (measured when this record was regenerated).
SUM_RTOL = 2e-3
DROPOUT = dict(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
COMMON = dict(
    max_steps=9, mask_update_interval=3, eta_total_steps=20, eta_max=20, learning_rate=3e-3, weight_decay=0.01,
    max_grad_norm=0.25, lr_scheduler_type="constant", mask_grad_batch_size=2, logging_steps=1,
)  # fmt: skip
ALL_TASKS = dict(task_sampling="all_tasks", per_device_train_batch_size=6)
ROUND_ROBIN = dict(task_sampling="round_robin", per_device_train_batch_size=2)
# name -> (config overrides, training arguments): every rule and score, and the train-mode gradient passes with dropout
RUNS: dict[str, tuple[dict, dict]] = {
    "harmony-fisher": ({}, dict(update_rule="harmony", score="fisher", **ALL_TASKS)),
    "harmony-magnitude": ({}, dict(update_rule="harmony", score="magnitude", **ALL_TASKS)),
    "harmony-churn": ({}, dict(update_rule="harmony", score="random", **ALL_TASKS)),
    "harmony-round-robin-dropout-train-mode": (
        DROPOUT,
        dict(update_rule="harmony", score="fisher", mask_grad_train_mode=True, **ROUND_ROBIN),
    ),
    "reference-fisher": ({}, dict(update_rule="reference", score="fisher", **ROUND_ROBIN)),
    "reference-magnitude-dropout": (DROPOUT, dict(update_rule="reference", score="magnitude", **ROUND_ROBIN)),
}


def platform() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run(name: str, output_dir: str | Path) -> dict:
    """Train run ``name``; its mask steps, k, hashes, losses and a digest of every tensor of the trained model."""
    config_overrides, args = RUNS[name]
    trainer = synthetic_trainer(output_dir, config_overrides, model_init=seed_by_name, **COMMON, **args)
    trainer.train()
    state = trainer.model.state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return {
        "mask_steps": [entry["step"] for entry in trainer.mask_history],
        "mask_k": [entry["mask/k"] for entry in trainer.mask_history],
        "mask_hashes": [entry["hash"] for entry in trainer.mask_history],
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "weights_sha256": digest.hexdigest(),
        "weight_sums": {k: float(v.double().sum()) for k, v in sorted(state.items()) if v.is_floating_point()},
    }


def record() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test suite runs
    try:
        with tempfile.TemporaryDirectory() as folder:
            return {name: run(name, Path(folder) / name) for name in RUNS}
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with trained_runs.json instead of writing it")
    args = parser.parse_args(argv)
    runs = record()
    if args.check:
        stored = json.loads(RECORD_FILE.read_text())["runs"]
        same = stored == runs
        print("trained_runs.json matches bit for bit" if same else json.dumps({"stored": stored, "now": runs}))
        return 0 if same else 1
    note = "Generated by tests/golden/trained_runs.py; regenerate only on purpose (see its docstring)."
    RECORD_FILE.write_text(json.dumps({"_note": note, "platform": platform(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {RECORD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
