"""The README's main job, end to end on a CPU: generate a small MT5 near-optimal dataset → train a tiny HarmoDT-F →
evaluate on MT5 → write a Hub-ready model folder (weights, card, figures, results JSON).

    python -m harmodt_hf.main_job [--smoke] [--output DIR]      # `bash scripts/main_job.sh` sets up .venv first

``--smoke`` runs a reduced form of every stage (2 episodes per task, a few training steps, one short evaluation
episode per task) to check the pipeline in about a minute. Re-running resumes the dataset generation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from harmodt_hf.configs import config_path

TINY_CONFIG = config_path("tiny")
TASKS = "mt5"
DATASET_CONFIG = "mt5-near-optimal"


@dataclass(frozen=True)
class JobSizes:
    """How much work each stage does."""

    episodes_per_task: int  # generated episodes per task (near-optimal = all of them)
    train_steps: int  # optimizer steps of the tiny config
    mask_update_interval: int  # outer (mask) update every this many steps
    eval_episodes: int  # evaluation episodes per task (one goal each)
    eval_max_steps: int  # episode length limit in evaluation (500 = the official protocol)
    logging_steps: int
    warmup_steps: int


# Sized for ≤ 20 minutes on a busy 2-core CPU; see the README for measured stage times.
FULL = JobSizes(
    episodes_per_task=100,
    train_steps=1000,
    mask_update_interval=100,
    eval_episodes=10,
    eval_max_steps=500,
    logging_steps=50,
    warmup_steps=100,
)
SMOKE = JobSizes(
    episodes_per_task=2,
    train_steps=12,
    mask_update_interval=6,
    eval_episodes=1,
    eval_max_steps=25,
    logging_steps=6,
    warmup_steps=2,
)


def _stage(number: int, total: int, title: str) -> None:
    print(f"\n[{number}/{total}] {title}", flush=True)


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"    {name}: {timings[name]:.1f} s", flush=True)
    return result


def generate(data_dir: Path, sizes: JobSizes, seed: int, num_workers: int) -> Path:
    """Generate (or resume) the MT5 dataset; a folder made with other sizes is regenerated."""
    from harmodt_hf.data.generation import generate_dataset

    kwargs = dict(seed=seed, num_workers=num_workers, progress=True)
    try:
        generate_dataset(data_dir, TASKS, sizes.episodes_per_task, **kwargs)
    except FileExistsError as error:
        if "other settings" not in str(error):
            raise
        print(f"    {data_dir} holds a dataset of other sizes: regenerating it", flush=True)
        generate_dataset(data_dir, TASKS, sizes.episodes_per_task, overwrite=True, **kwargs)
    return data_dir


def train(data_dir: Path, train_dir: Path, sizes: JobSizes, seed: int) -> Path:
    """Train HarmoDT-F with the shipped ``harmodt_hf/configs/tiny.yaml``; returns the final model folder."""
    from harmodt_hf.training.cli import main as train_main

    argv = [
        "--config", str(TINY_CONFIG),
        "--dataset", str(data_dir),
        "--dataset_config", DATASET_CONFIG,
        "--output_dir", str(train_dir),
        "--max_steps", str(sizes.train_steps),
        "--mask_update_interval", str(sizes.mask_update_interval),
        "--logging_steps", str(sizes.logging_steps),
        "--warmup_steps", str(sizes.warmup_steps),
        "--save_steps", str(sizes.train_steps),
        "--seed", str(seed),
        "--overwrite_output_dir", "true",  # the job retrains from scratch on every run
    ]  # fmt: skip
    return train_main(argv)


def record_video(model, results: dict, video_dir: Path, sizes: JobSizes, seed: int) -> Path | None:
    """Film episode 0 of one task (a task whose episode 0 succeeded, if any) — the same episode as in ``results``.

    Rendering needs an OpenGL backend (``MUJOCO_GL=egl`` by default); without one the job goes on without a video.
    """
    from harmodt_hf.evaluation.rollouts import evaluate
    from harmodt_hf.evaluation.workers import check_mp4_support

    try:
        check_mp4_support()
    except RuntimeError as error:
        print(f"    no video: {error}", flush=True)
        return None
    tasks = results["tasks"]
    task = next((t for t in tasks if results["per_task"][t]["successes"][0]), tasks[0])
    try:
        filmed = evaluate(
            model,
            tasks=[task],
            episodes_per_task=1,
            seed=seed,
            num_workers=0,
            max_steps=sizes.eval_max_steps,
            video_episodes=1,
            video_dir=video_dir,
            video_format="mp4",
        )
    except Exception:  # a missing GL backend must not cost the whole job its model folder
        print("    no video (rendering failed):\n" + traceback.format_exc(limit=2), flush=True)
        return None
    return Path(filmed["per_task"][task]["videos"]["0"])


def run(
    output: Path,
    sizes: JobSizes,
    *,
    seed: int = 0,
    num_workers: int = 2,
    threads: int = 1,
    video: bool = True,
) -> dict[str, Any]:
    """Run every stage into ``output`` (``data/``, ``train/``, ``model/``); returns the job summary."""
    from harmodt_hf import HarmoDTModel
    from harmodt_hf.evaluation.rollouts import evaluate
    from harmodt_hf.hub.cards import write_model_folder

    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for the video (before mujoco is imported)
    torch.set_num_threads(threads)
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    total = 5 if video else 4

    _stage(1, total, f"generate {TASKS.upper()} data: {sizes.episodes_per_task} episodes per task -> {output / 'data'}")
    data_dir = _timed(timings, "generate", lambda: generate(output / "data", sizes, seed, num_workers))

    _stage(2, total, f"train HarmoDT-F (tiny config, {sizes.train_steps} steps) -> {output / 'train'}")
    final = _timed(timings, "train", lambda: train(data_dir, output / "train", sizes, seed))
    summary = json.loads((final / "training_summary.json").read_text())

    _stage(3, total, f"evaluate on {TASKS.upper()}: {sizes.eval_episodes} episode(s) per task")
    model = HarmoDTModel.from_pretrained(final)
    results = _timed(
        timings,
        "evaluate",
        lambda: evaluate(
            model,
            tasks=model.config.task_names,
            episodes_per_task=sizes.eval_episodes,
            seed=seed,
            num_workers=num_workers,
            max_steps=sizes.eval_max_steps,
            progress=True,
        ),
    )

    video_path = None
    if video:
        _stage(4, total, "record one evaluation episode as a video")
        video_path = _timed(timings, "video", lambda: record_video(model, results, output / "videos", sizes, seed))

    _stage(total, total, f"write the model folder -> {output / 'model'}")
    folder = _timed(
        timings,
        "model_folder",
        lambda: write_model_folder(model, output / "model", results, training_summary=summary, video=video_path),
    )
    timings["total"] = round(time.perf_counter() - start, 1)
    job = {
        "model_folder": str(folder),
        "mean_success_rate": results["mean_success_rate"],
        "success_rate": {task: entry["success_rate"] for task, entry in results["per_task"].items()},
        "sizes": asdict(sizes),
        "seed": seed,
        "num_workers": num_workers,
        "torch_threads": threads,
        "timings_s": timings,
    }
    (output / "main_job_summary.json").write_text(json.dumps(job, indent=2))
    return job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="reduced form of every stage (about a minute)")
    parser.add_argument("--output", default=None, help="job folder (default runs/main_job or runs/main_job_smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=min(2, os.cpu_count() or 1), help="generation/env processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny model's ops are small)")
    parser.add_argument("--episodes-per-task", type=int, default=None, help="override the generated episodes")
    parser.add_argument("--train-steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--eval-episodes", type=int, default=None, help="override the evaluation episodes per task")
    parser.add_argument("--no-video", action="store_true", help="skip the rollout video")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    overrides = {
        "episodes_per_task": args.episodes_per_task,
        "train_steps": args.train_steps,
        "eval_episodes": args.eval_episodes,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    output = Path(args.output or ("runs/main_job_smoke" if args.smoke else "runs/main_job"))
    job = run(
        output,
        sizes,
        seed=args.seed,
        num_workers=args.num_workers,
        threads=args.threads,
        video=not args.no_video,
    )
    timings = job["timings_s"]
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items() if name != "total")
    print(f"\nMain job finished in {timings['total']:.0f} s ({parts}).")
    print(f"Mean success rate on {TASKS.upper()}: {100 * job['mean_success_rate']:.1f} %")
    print(f"Model folder (weights, README.md card, images/, results.json): {job['model_folder']}")
    print(f"Job summary: {Path(job['model_folder']).parent / 'main_job_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
