"""Nothing silent in training (#18): resuming under another setup, checkpoints without their masks, the mask history
across resumes, an earlier run in the output folder, contradictory flags, max_ep_len, and bad batches.

Every test works on real files: the session's generated Meta-World dataset and a real training run's checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GENERATED_TASKS
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from harmodt_hf.training.cli import build_trainer, load_episodes, main, parse_train_args
from harmodt_hf.training.segments import collate_segments

logging.disable_progress_bar()
REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--hidden_size", "32", "--n_layer", "2", "--n_head", "2", "--n_inner", "64", "--context_length", "10",
    "--prompt_length", "3", "--dropout", "0.0",
]  # fmt: skip


def _argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(dataset), "--dataset_config", "all-near-optimal", "--output_dir", str(out), *SMALL,
        "--per_device_train_batch_size", "12", "--task_sampling", "all_tasks", "--learning_rate", "1e-3",
        "--max_steps", "10", "--mask_update_interval", "5", "--eta_total_steps", "100", "--eta_max", "40",
        "--mask_grad_batch_size", "4", "--logging_steps", "5", "--save_strategy", "steps", "--save_steps", "10",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(generated_dataset, tmp_path_factory) -> Path:
    """A finished 10-step HarmoDT-F run: mask updates at steps 5 and 10, checkpoint-10 and final/."""
    out = tmp_path_factory.mktemp("finished") / "run"
    main(_argv(generated_dataset, out))
    assert (out / "checkpoint-10" / "harmodt_run.json").is_file()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _summary(out: Path) -> dict:
    return json.loads((out / "final" / "training_summary.json").read_text())


# ------------------------------------------------------------------------------------------------ resume
def test_resume_with_the_task_list_reordered_is_refused(generated_dataset, finished_run, tmp_path):
    reordered = list(reversed(GENERATED_TASKS))
    argv = _argv(generated_dataset, tmp_path / "new", "--resume_from_checkpoint", str(finished_run / "checkpoint-10"),
                 "--max_steps", "20", "--tasks", *reordered)  # fmt: skip
    with pytest.raises(ValueError, match="task_names: the checkpoint has") as error:
        main(argv)
    assert str(GENERATED_TASKS) in str(error.value) and str(reordered) in str(error.value)
    assert "its task list in the same order" in str(error.value)


@pytest.mark.parametrize("variant, mask_mode", [("prompt-dt", "'none'"), ("harmodt-r", "'random'")])
def test_resume_with_another_variant_is_refused(generated_dataset, finished_run, tmp_path, variant, mask_mode):
    argv = _argv(generated_dataset, tmp_path / "new", "--resume_from_checkpoint", str(finished_run / "checkpoint-10"),
                 "--max_steps", "20", "--variant", variant)  # fmt: skip
    with pytest.raises(ValueError, match=f"mask_mode: the checkpoint has 'harmony', this run {mask_mode}"):
        main(argv)


def test_resume_from_a_checkpoint_without_masks_is_refused(generated_dataset, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    weights = run / "checkpoint-10" / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not k.endswith("packed_masks")}, weights, metadata={"format": "pt"})
    argv = _argv(generated_dataset, run, "--resume_from_checkpoint", str(run / "checkpoint-10"), "--max_steps", "20")
    with pytest.raises(ValueError, match="lacks the task masks .* freshly drawn masks"):
        main(argv)


def test_resume_from_a_checkpoint_whose_masks_changed_is_refused(generated_dataset, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    weights = run / "checkpoint-10" / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("packed_masks"))
    tensors[key][0, 0] ^= 1  # one weight of task 0 switched
    save_file(tensors, weights, metadata={"format": "pt"})
    argv = _argv(generated_dataset, run, "--resume_from_checkpoint", str(run / "checkpoint-10"), "--max_steps", "20")
    with pytest.raises(ValueError, match="changed since"):
        main(argv)


def test_resume_of_the_reference_rule_without_its_extra_masks_is_refused(generated_dataset, tmp_path):
    out = tmp_path / "reference"
    main(_argv(generated_dataset, out, "--update_rule", "reference"))
    (out / "checkpoint-10" / "reference_extra_masks.safetensors").unlink()
    argv = _argv(generated_dataset, out, "--update_rule", "reference", "--resume_from_checkpoint",
                 str(out / "checkpoint-10"), "--max_steps", "20")  # fmt: skip
    with pytest.raises(ValueError, match="lacks reference_extra_masks.safetensors"):
        main(argv)


def test_mask_history_and_hash_files_continue_across_resumes(generated_dataset, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    assert [r["step"] for r in _summary(run)["mask_history"]] == [5, 10]
    checkpoint = str(run / "checkpoint-10")
    # resuming the finished run as it was: nothing to train, the history stays (it used to be written empty)
    main(_argv(generated_dataset, run, "--resume_from_checkpoint", checkpoint))
    assert _summary(run)["mask_history"] == _summary(finished_run)["mask_history"]
    # resuming it for 10 more steps: the checkpoint's updates, then the new ones, in the summary and the hash file
    main(_argv(generated_dataset, run, "--resume_from_checkpoint", checkpoint, "--max_steps", "20"))
    history = _summary(run)["mask_history"]
    assert [r["step"] for r in history] == [5, 10, 15, 20]
    assert history[:2] == _summary(finished_run)["mask_history"]
    hashes = json.loads((run / "mask_hashes" / "rank0.json").read_text())
    assert hashes == [{"step": r["step"], "hash": r["hash"]} for r in history]
    assert json.loads((run / "checkpoint-20" / "harmodt_run.json").read_text())["mask_history"] == history


# ------------------------------------------------------------------------------------------------ output folder
def test_training_into_a_finished_run_needs_overwrite_output_dir(generated_dataset, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    final_weights = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-10, final\).*--overwrite_output_dir"):
        main(_argv(generated_dataset, run, "--seed", "1"))
    assert (run / "final" / "model.safetensors").read_bytes() == final_weights  # untouched
    with pytest.raises(ValueError, match="contradict"):
        main(_argv(generated_dataset, run, "--resume_from_checkpoint", str(run / "checkpoint-10"),
                   "--overwrite_output_dir", "true"))  # fmt: skip
    main(_argv(generated_dataset, run, "--seed", "1", "--overwrite_output_dir", "true", "--max_steps", "5",
               "--save_steps", "5"))  # fmt: skip
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-5"]  # the earlier run's checkpoint went
    assert _summary(run)["seed"] == 1 and (run / "final" / "model.safetensors").read_bytes() != final_weights


# ------------------------------------------------------------------------------------------------ flags
def test_score_contradicting_the_variant_is_refused(tmp_path):
    base = ["--dataset", "x", "--max_steps", "1", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--score magnitude contradicts --variant harmodt-f.*--variant harmodt-m"):
        parse_train_args([*base, "--variant", "harmodt-f", "--score", "magnitude"])
    config = tmp_path / "f.yaml"
    config.write_text("variant: harmodt-f\n")
    with pytest.raises(ValueError, match="contradicts --variant harmodt-f"):
        parse_train_args(["--config", str(config), *base, "--score=magnitude"])
    with pytest.raises(ValueError, match="prompt-dt, which has no mask updates to score"):
        parse_train_args([*base, "--variant", "prompt-dt", "--score", "fisher"])
    assert parse_train_args([*base, "--variant", "harmodt-m", "--score", "magnitude"])[2].score == "magnitude"
    assert parse_train_args([*base, "--variant", "harmodt-m"])[2].score == "magnitude"  # the variant's, unasked


def test_max_ep_len_below_the_episodes_is_refused_at_start(generated_dataset, tmp_path):
    longest = max(
        len(r) for r in load_episodes(parse_train_args(_argv(generated_dataset, tmp_path))[1]).tasks[0].rewards
    )
    assert longest > 100
    with pytest.raises(ValueError, match=f"episodes of up to {longest} steps .* Set max_ep_len >= {longest}"):
        main(_argv(generated_dataset, tmp_path / "short", "--max_ep_len", "100"))
    assert not (tmp_path / "short").exists()
    with pytest.raises(ValueError, match="shorter than the 500-step episodes of the evaluations"):
        parse_train_args(_argv(generated_dataset, tmp_path, "--max_ep_len", "400", "--eval_every", "5",
                               "--eval_episodes", "1"))  # fmt: skip


# ------------------------------------------------------------------------------------------------ batches
def test_empty_batches_and_float64_states_get_a_clear_error(generated_dataset, tmp_path):
    model_args, data_args, training_args = parse_train_args(_argv(generated_dataset, tmp_path))
    trainer = build_trainer(model_args, data_args, training_args, load_episodes(data_args))
    items = [trainer.train_dataset[i] for i in range(3)]
    with pytest.raises(ValueError, match="no segments"):
        collate_segments([])
    float64 = [{**item, "states": item["states"].astype(np.float64)} for item in items]
    with pytest.raises(ValueError, match="'states' is torch.float64, expected torch.float32.*cast"):
        collate_segments(float64)
    batch = collate_segments(items)  # a custom collator could hand the trainer such a batch: refused there too
    with pytest.raises(ValueError, match="'states' is torch.float64"):
        trainer.training_step(trainer.model, {**batch, "states": batch["states"].double()})
    with pytest.raises(ValueError, match="empty"):
        trainer.training_step(trainer.model, {k: v[:0] for k, v in batch.items() if torch.is_tensor(v)})


def test_train_help_works():
    """--help lists the options (an unescaped % in a help string crashed it)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "train.py"), "--help"],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("--variant", "--hidden_size", "--score", "--overwrite_output_dir", "--resume_from_checkpoint"):
        assert option in result.stdout
    assert "HarmoDTConfig.hidden_size" in result.stdout  # the model options come from HarmoDTConfig
