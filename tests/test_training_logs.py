"""The success rate measured during training reaches every report_to backend: a real run logs to TensorBoard and the
event file holds the mean and per-task success (#17)."""

from __future__ import annotations

import pytest
from conftest import GENERATED_TASKS
from transformers.utils import logging

from harmodt_hf.training.cli import build_trainer, load_episodes, parse_train_args
from harmodt_hf.training.eval_callback import SuccessRateCallback

logging.disable_progress_bar()


@pytest.mark.slow
def test_success_rate_reaches_tensorboard_and_the_log_history_once(generated_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [
        "--dataset", str(generated_dataset), "--dataset_config", "all-near-optimal", "--output_dir", str(tmp_path),
        "--hidden_size", "32", "--n_layer", "1", "--n_head", "2", "--n_inner", "64", "--context_length", "5",
        "--prompt_length", "2", "--per_device_train_batch_size", "6", "--task_sampling", "all_tasks",
        "--max_steps", "4", "--mask_update_interval", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "tensorboard", "--use_cpu", "true", "--disable_tqdm", "true",
    ]  # fmt: skip
    model_args, data_args, training_args = parse_train_args(argv)
    callback = SuccessRateCallback(eval_tasks=GENERATED_TASKS[:2], eval_episodes=1, eval_steps=2, max_steps=5,
                                   num_workers=0)  # fmt: skip
    trainer = build_trainer(model_args, data_args, training_args, load_episodes(data_args), [callback])
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "eval/mean_success_rate" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # once per evaluation
    (run_dir,) = (tmp_path / "runs").iterdir()  # TensorBoard's default: <output_dir>/runs/<date>_<host>
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("eval/mean_success_rate", *(f"eval/success/{task}" for task in GENERATED_TASKS[:2])):
        scalars = events.Scalars(f"train/{key}")  # transformers prefixes what is logged during training
        assert [s.step for s in scalars] == [2, 4], tags
        assert [s.value for s in scalars] == [entry[key] for entry in logged]
    assert "train/loss" in tags and "train/mask/k" in tags  # the training and mask logs, as before
