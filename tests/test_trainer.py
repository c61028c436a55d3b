"""HarmoDTTrainer and training/train.py on generated Meta-World data: mask loop, baselines, processes, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import GENERATED_TASKS
from transformers import TrainerCallback
from transformers.utils import logging

from harmodt_hf import HarmoDTModel
from harmodt_hf.training.cli import build_trainer, load_episodes, main, parse_train_args
from harmodt_hf.training.trainer import HarmoDTTrainingArguments

logging.disable_progress_bar()
REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = [
    "--hidden_size", "32", "--n_layer", "2", "--n_head", "2", "--n_inner", "64", "--context_length", "10",
    "--prompt_length", "3", "--dropout", "0.0",
]  # fmt: skip


def _argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(dataset), "--dataset_config", "all-near-optimal", "--output_dir", str(out),
        *SMALL_MODEL, "--per_device_train_batch_size", "12", "--task_sampling", "all_tasks",
        "--learning_rate", "1e-3", "--max_steps", "40", "--mask_update_interval", "10", "--eta_total_steps", "100",
        "--eta_max", "40", "--mask_grad_batch_size", "4", "--logging_steps", "10", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]  # fmt: skip


def _summary(final: Path) -> dict:
    return json.loads((final / "training_summary.json").read_text())


def test_harmony_run_moves_masks_keeps_density_and_learns(generated_dataset, tmp_path):
    argv = _argv(generated_dataset, tmp_path / "run", "--max_steps", "60", "--learning_rate", "3e-3",
                 "--lr_scheduler_type", "constant")  # fmt: skip
    final = main(argv)
    history = _summary(final)["mask_history"]
    assert [r["step"] for r in history] == [10, 20, 30, 40, 50, 60]
    hashes = [r["hash"] for r in history]
    assert len(set(hashes)) == len(hashes)  # every outer step changed the masks
    for r in history:
        assert r["mask/k"] > 0 and r["mask/pruned"] == r["mask/regrown"] == r["mask/k"] * len(GENERATED_TASKS)
        for task in GENERATED_TASKS:
            assert r[f"mask/density/{task}"] == history[0][f"mask/density/{task}"]
    train_losses = json.loads((tmp_path / "run" / "final" / "trainer_log.json").read_text())
    assert len(train_losses) == 6 and train_losses[-1] < 0.75 * train_losses[0]
    model = HarmoDTModel.from_pretrained(final)
    assert model.config.task_names == GENERATED_TASKS
    assert model.config.state_mean[0] != [0.0] * 39  # stats come from the data
    assert model.task_prompts(torch.tensor([0, 2]))["attention_mask"].all()


@pytest.mark.parametrize(
    "variant, extra",
    [
        ("harmodt-f", ["--update_rule", "reference", "--task_sampling", "round_robin", "--per_device_train_batch_size",
                       "4"]),
        ("harmodt-f", ["--bf16", "true"]),  # bf16 autocast on CPU, mask gradients included
        ("harmodt-m", []),
        ("harmodt-r", []),
        ("prompt-dt", []),
        ("mtdt", []),
    ],
)  # fmt: skip
def test_variants_train_and_load(generated_dataset, tmp_path, variant, extra):
    argv = _argv(generated_dataset, tmp_path / variant, "--variant", variant, "--max_steps", "20", *extra)
    final = main(argv)
    summary = _summary(final)
    model = HarmoDTModel.from_pretrained(final)
    assert model.config.variant == variant
    if variant in ("harmodt-f", "harmodt-m"):
        assert len(summary["mask_history"]) == 2 and summary["mask_history"][0]["mask/k"] > 0
        assert len({r["hash"] for r in summary["mask_history"]}) == 2
        losses = [v for r in summary["mask_history"] for k, v in r.items() if k.startswith("mask/loss/")]
        assert losses and all(0 < v < 10 for v in losses)
    else:
        assert summary["mask_history"] == []
    if variant == "harmodt-r":  # fixed random masks: exactly the ERK draw of a fresh model
        fresh = HarmoDTModel(model.config)
        assert all(torch.equal(m, fresh.get_task_masks()[k]) for k, m in model.get_task_masks().items())
    assert model.config.has_masks == (variant.startswith("harmodt"))
    assert model.config.use_prompt == (variant != "mtdt")


def test_round_robin_leaves_other_tasks_weights_untouched(generated_dataset, tmp_path):
    """One task per step: weights outside that task's mask keep their value (weight decay and Adam included)."""
    argv = _argv(generated_dataset, tmp_path / "rr", "--task_sampling", "round_robin", "--per_device_train_batch_size",
                 "4", "--max_steps", "6", "--mask_update_interval", "1000", "--weight_decay", "0.1")  # fmt: skip
    model_args, data_args, training_args = parse_train_args(argv)
    trainer = build_trainer(model_args, data_args, training_args, load_episodes(data_args))
    model = trainer.model
    before = {n: model.get_parameter(n).detach().clone() for n in model.get_task_masks()}
    trainer.train()
    union = {n: m[:3].any(0) for n, m in model.get_task_masks().items()}  # steps 1-6 cover tasks 0, 1, 2
    moved = 0
    for name, used in union.items():
        weight = model.get_parameter(name).detach()
        assert torch.equal(weight[~used], before[name][~used]), name
        moved += int((weight[used] != before[name][used]).sum())
    assert moved > 0


@pytest.mark.parametrize(
    "rule, flag, expected",
    [("harmony", None, False), ("reference", None, True), ("harmony", "true", True), ("reference", "false", False)],
)
def test_mask_gradient_mode_defaults_to_eval_for_harmony(generated_dataset, tmp_path, rule, flag, expected):
    """Mask gradients: eval mode (no dropout) by default for 'harmony', train mode for 'reference'; the flag wins.
    The model is back in train mode afterwards."""
    extra = ["--update_rule", rule, "--max_steps", "1"] + (["--mask_grad_train_mode", flag] if flag else [])
    model_args, data_args, training_args = parse_train_args(_argv(generated_dataset, tmp_path / "m", *extra))
    trainer = build_trainer(model_args, data_args, training_args, load_episodes(data_args))
    seen = []
    real_loss = trainer._task_loss
    trainer._task_loss = lambda task, tag: seen.append(trainer.model.training) or real_loss(task, tag)
    trainer.model.train()
    trainer.state.max_steps, trainer.state.global_step = 100, 25
    trainer.update_masks()
    assert seen and set(seen) == {expected}
    assert trainer.model.training


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_matches_uninterrupted_run(generated_dataset, tmp_path):
    def build(out: Path, callbacks=None):
        argv = _argv(generated_dataset, out, "--max_steps", "20", "--mask_update_interval", "5", "--save_strategy",
                     "steps", "--save_steps", "10", "--dropout", "0.1")  # fmt: skip
        model_args, data_args, training_args = parse_train_args(argv)
        return build_trainer(model_args, data_args, training_args, load_episodes(data_args), callbacks)

    full = build(tmp_path / "full")
    full.train()
    stopped = build(tmp_path / "part", [_StopAt(10)])
    stopped.train()
    assert stopped.state.global_step == 10 and (tmp_path / "part" / "checkpoint-10").is_dir()
    del stopped
    resumed = build(tmp_path / "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-10"))
    assert resumed.state.global_step == 20
    # the mask history continues across the resume: the checkpoint's two updates, then the resumed run's two
    assert [r["step"] for r in resumed.mask_history] == [5, 10, 15, 20]
    assert resumed.mask_history == full.mask_history
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_hold_identical_masks(generated_dataset, tmp_path):
    out = tmp_path / "ddp"
    argv = _argv(generated_dataset, out, "--max_steps", "20", "--mask_update_interval", "5")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # --standalone: rendezvous on localhost at a free port (port 0): concurrent test runs on one machine never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "training" / "train.py"), *argv]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / "mask_hashes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [5, 10, 15, 20]
    assert ranks[0] == ranks[1]
    assert len({r["hash"] for r in ranks[0]}) == 4
    model = HarmoDTModel.from_pretrained(out / "final")
    assert model.config.task_names == GENERATED_TASKS
    assert _summary(out / "final")["mask_history"][-1]["hash"] == ranks[0][-1]["hash"]


@pytest.mark.slow
def test_accelerate_launch_tiny_config_end_to_end(generated_dataset, tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training" / "accelerate" / "cpu.yaml"), str(REPO / "training" / "train.py"),
           "--config", str(REPO / "harmodt_hf" / "configs" / "tiny.yaml"), "--dataset", str(generated_dataset),
           "--dataset_config", "all-near-optimal", "--output_dir", str(out), "--max_steps", "6",
           "--per_device_train_batch_size", "6", "--mask_update_interval", "3", "--save_steps", "3"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Model saved to" in result.stdout
    model = HarmoDTModel.from_pretrained(out / "final")
    assert model.config.hidden_size == 64 and model.config.task_names == GENERATED_TASKS
    assert (out / "checkpoint-6" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ bad input
def test_dataset_tasks_missing_from_config_is_refused(generated_dataset, tmp_path):
    from harmodt_hf.training.segments import SegmentDataset, SegmentSampler
    from harmodt_hf.training.trainer import HarmoDTTrainer

    model_args, data_args, training_args = parse_train_args(_argv(generated_dataset, tmp_path))
    buffer = load_episodes(data_args)
    trainer = build_trainer(model_args, data_args, training_args, buffer)
    config = trainer.model.config
    dataset = trainer.train_dataset
    other = HarmoDTModel(type(config)(**{**config.to_diff_dict(), "task_names": ["reach-v3", "push-v3", "a-v3"]}))
    with pytest.raises(ValueError, match="missing from the config"):
        HarmoDTTrainer(model=other, args=training_args, train_dataset=dataset)
    with pytest.raises(ValueError, match="differ from the data"):
        SegmentDataset(SegmentSampler(buffer, other.config), 10, 12)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask_update_interval", "0"], "mask_update_interval"),
        (["--eta_max", "100000"], "eta_max"),
        (["--task_sampling", "sideways"], "task_sampling"),
        (["--variant", "harmodt-x"], "variant"),
        (["--tasks", "push-v3"], "not in"),
        (["--per_device_train_batch_size", "4"], "multiple of the number of tasks"),
    ],
)
def test_bad_training_input_fails_before_training(generated_dataset, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        main(_argv(generated_dataset, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "final").exists()


def test_unknown_yaml_key_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("variant: mtdt\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_train_args(["--config", str(config), "--dataset", "x", "--max_steps", "1"])


def test_yaml_extends_and_command_line_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("variant: mtdt\nlearning_rate: 0.5\nmax_steps: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nlearning_rate: 0.25\n")
    _, _, args = parse_train_args(["--config", str(tmp_path / "child.yaml"), "--dataset", "x", "--max_steps", "9",
                                   "--output_dir", str(tmp_path)])  # fmt: skip
    assert isinstance(args, HarmoDTTrainingArguments)
    assert (args.learning_rate, args.max_steps) == (0.25, 9)


def test_paper_configs_parse():
    folder = REPO / "harmodt_hf" / "configs" / "paper"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) == 40
    model_args, data_args, args = parse_train_args(["--config", str(folder / "harmodt-m_mt50-sub-optimal.yaml"),
                                                    "--dataset", "x"])  # fmt: skip
    assert (model_args.variant, data_args.dataset_config, args.score) == ("harmodt-m", "mt50-sub-optimal", "magnitude")
    assert (args.learning_rate, args.max_grad_norm, args.mask_update_interval, args.per_device_train_batch_size) == (
        1e-4,
        0.25,
        5000,
        8,
    )


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_and_names_the_fix(generated_dataset, tmp_path, monkeypatch, native):
    """bf16 autocast is emulated (about 10x slower) on CPUs without AVX512-BF16/AMX: the trainer says so at once."""
    monkeypatch.setattr("harmodt_hf.cpu_features.has_native_bf16", lambda: native)
    argv = _argv(generated_dataset, tmp_path, "--bf16", "true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_trainer(*parse_train_args(argv), load_episodes(parse_train_args(argv)[1]))
    messages = [str(w.message) for w in caught if "without native bf16" in str(w.message)]
    assert len(messages) == (0 if native else 1)
    assert native or "Train without --bf16" in messages[0]
