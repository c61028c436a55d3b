"""Golden outputs of a tiny fixed-seed HarmoDT, checked by tests/test_golden.py.

Stored in ``golden.json`` beside this file: the actions a tiny model predicts for fixed inputs, and, for a few steps
of ``HarmoDTTrainer`` on fixed in-memory data (one run per mask rule, each with mask updates), the training losses,
the mask-update losses, the prune counts k and the mask hashes. A change of the arithmetic that every code path
shares (an embedding term, a normalisation, the loss, the optimizer step, the mask selection) changes these numbers,
so it fails a test even where the code paths still agree with each other.

Regenerating is a deliberate act: run it only when the model's or the training's arithmetic is *meant* to change,
and give the reason in the commit message (e.g. "goldens regenerated: the η schedule is indexed by step - 1"):

    cd <repo> && PYTHONPATH=$PWD python tests/golden/regenerate.py

(``--check`` compares instead of writing.) Weights and masks are seeded by parameter name, not by the order in
which modules are built, so moving modules around does not change the goldens; renaming parameters does.

The "reference" run's masks (and its losses after the first mask update) also depend on the tie order of
``torch.topk``: the official regrow score ties every inactive body weight at exactly 1.0 (REFERENCE.md, flaw 1; about
4,900 ties per task here). That order is fixed for a given torch build, so a torch upgrade may move these numbers
without any change of ours: ``_generated_with`` records the torch version. The "harmony" run has no ties (its k-th
and (k+1)-th scores differ by 1e-3 relative or more).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import zlib
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import TASKS, synthetic_trainer, tiny_config  # noqa: E402

from harmodt_hf import HarmoDTModel  # noqa: E402

GOLDEN_FILE = Path(__file__).with_name("golden.json")
SEED = 2024
ACTION_ATOL = 1e-5  # actions in [-1, 1]: float32 rounding of a 2-layer model differs by ~1e-7 between kernels
LOSS_RTOL = 1e-4  # losses after a few AdamW steps; the mask hashes must match exactly
# The training runs: the harmony rule on all tasks per step, and the official rule one task per step.
TRAINING_RUNS = {
    "harmony": dict(update_rule="harmony", task_sampling="all_tasks", per_device_train_batch_size=6),
    "reference": dict(update_rule="reference", task_sampling="round_robin", per_device_train_batch_size=2),
}
TRAINING_ARGS = dict(
    max_steps=6, mask_update_interval=3, eta_total_steps=20, eta_max=20, learning_rate=3e-3, weight_decay=0.01,
    max_grad_norm=0.25, lr_scheduler_type="constant", mask_grad_batch_size=2, logging_steps=1,
)  # fmt: skip


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 2**32 + zlib.crc32(name.encode()))


@torch.no_grad()
def seed_by_name(model: HarmoDTModel) -> HarmoDTModel:
    """Give every parameter and task mask values drawn from a generator seeded by its name: weights and (non-zero)
    biases N(0, 0.1²), LayerNorm weights 1 + N(0, 0.1²), task masks of density 0.7."""
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, param in sorted(model.named_parameters()):
        values = torch.randn(param.shape, generator=_generator(name)) * 0.1
        param.copy_(values + (1.0 if name in norms else 0.0))
    masks = {n: torch.rand(m.shape, generator=_generator("mask:" + n)) < 0.7 for n, m in model.get_task_masks().items()}
    model.set_task_masks(masks)
    return model


def golden_model() -> HarmoDTModel:
    """The tiny model of the action goldens (tiny config, prompts on, dropout 0), in eval mode."""
    return seed_by_name(HarmoDTModel(tiny_config())).eval()


def golden_inputs(config) -> dict:
    """Four samples of tasks [2, 0, 1, 0] (unsorted, unequal groups), one left-padded, each with its own prompt."""
    g = torch.Generator().manual_seed(SEED)
    task_ids = torch.tensor([2, 0, 1, 0])
    batch, k, p = len(task_ids), config.context_length, config.prompt_length

    def steps(length: int, start: int) -> dict:
        return dict(
            states=torch.randn(batch, length, config.state_dim, generator=g),
            actions=torch.rand(batch, length, config.act_dim, generator=g) * 2 - 1,
            returns_to_go=torch.rand(batch, length, 1, generator=g) * 4,
            timesteps=torch.arange(start, start + length).repeat(batch, 1) + torch.tensor([[0], [7], [30], [61]]),
            attention_mask=torch.ones(batch, length, dtype=torch.long),
        )

    inputs = {**steps(k, 5), "task_ids": task_ids, "prompt": steps(p, 0)}
    inputs["attention_mask"][1, :2] = 0
    return inputs


def golden_actions() -> list:
    model = golden_model()
    with torch.no_grad():
        return model(**golden_inputs(model.config)).action_preds.tolist()


def golden_training(rule: str, output_dir: str | Path) -> dict:
    """A few HarmoDTTrainer steps (mask updates at steps 3 and 6) of the seeded-by-name model on fixed data."""
    trainer = synthetic_trainer(output_dir, model_init=seed_by_name, **TRAINING_RUNS[rule], **TRAINING_ARGS)
    trainer.train()
    history = trainer.mask_history
    return {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "mask_steps": [entry["step"] for entry in history],
        "mask_k": [entry["mask/k"] for entry in history],
        "mask_hashes": [entry["hash"] for entry in history],
        "mask_losses": [[entry[f"mask/loss/{task}"] for task in TASKS] for entry in history],
    }


def compute_goldens() -> dict:
    """Every golden, computed with one torch thread (as the test suite runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            training = {rule: golden_training(rule, Path(folder) / rule) for rule in TRAINING_RUNS}
        return {"actions": golden_actions(), "training": training}
    finally:
        torch.set_num_threads(threads)


def _dumps(value) -> str:
    """JSON with one line per innermost list (a step's action, a run's losses)."""
    text = json.dumps(value, indent=1)
    return re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with golden.json instead of writing it")
    args = parser.parse_args(argv)
    goldens = compute_goldens()
    if args.check:
        stored = {k: v for k, v in json.loads(GOLDEN_FILE.read_text()).items() if not k.startswith("_")}
        same = stored == goldens
        print("golden.json matches bit for bit" if same else json.dumps({"stored": stored, "now": goldens}, indent=1))
        return 0 if same else 1
    note = "Generated by tests/golden/regenerate.py; regenerate only on purpose (see its docstring)."
    generated_with = {"torch": torch.__version__, "python": sys.version.split()[0]}
    GOLDEN_FILE.write_text(_dumps({"_note": note, "_generated_with": generated_with, **goldens}) + "\n")
    print(f"wrote {GOLDEN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
