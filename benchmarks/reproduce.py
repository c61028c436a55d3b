"""Train and evaluate several arms (variants and mask-schedule settings) with paired seeds on one dataset.

    python benchmarks/reproduce.py --config benchmarks/configs/harmony_study.yaml --output runs/harmony_study

An *arm* is a name and the training settings it changes (a variant such as ``harmodt-f`` or ``prompt-dt`` and, for
instance, ``eta_max_fraction``); the study YAML lists the arms, the seeds, the data and the shared training settings
(``benchmarks/configs/``). Every arm runs with every seed: the seed fixes the initial weights, the data order and the
ERK mask draw (the mask seed is the run's seed), so arms with one seed start from the same weights and masks (paired).
Each run is ``training/train.py``'s code path in a fresh process, with a Meta-World evaluation every ``eval_every``
steps and at the end (evaluation seed fixed and separate from the training seeds; nothing is chosen on it). The last
evaluation is the primary number; ``best`` is the best of the run's evaluations and is reported only beside it.

Writes into the output folder: ``results.json`` (one record per arm and seed, the summary per arm and the paired
differences with bootstrap intervals over seeds), ``results.md``, ``success_by_arm.png`` (mean and per-seed success),
``moved_share.png`` (share of each task's mask moved over training), ``success_curves.png``. Finished runs are
skipped, so an interrupted study resumes; ``--summarise-only`` reports the runs finished so far.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

STUDY_KEYS = (
    "tasks",
    "quality",
    "episodes_per_task",
    "data_seed",
    "arms",
    "variants",
    "seeds",
    "eval_every",
    "eval_episodes",
    "eval_num_workers",
    "eval_tasks_at_once",
    "train",
    "compare",
    "bootstrap_resamples",
)
REPO = Path(__file__).resolve().parents[1]


def load_study(path: Path) -> dict:
    """The study YAML; ``variants: [a, b]`` is shorthand for ``arms: {a: {variant: a}, b: {variant: b}}``. An arm may
    list its own ``seeds`` (a subset of the study's)."""
    study = yaml.safe_load(path.read_text())
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {path}; known: {STUDY_KEYS}")
    if "variants" in study:
        study.setdefault("arms", {v: {"variant": v} for v in study.pop("variants")})
    for arm, settings in study["arms"].items():
        if "variant" not in settings:
            raise ValueError(f"Arm {arm!r} in {path} needs a 'variant'")
    for pair in study.get("compare", []):
        missing = [a for a in pair if a not in study["arms"]]
        if len(pair) != 2 or missing:
            raise ValueError(f"compare entries are pairs of arm names, got {pair} (unknown: {missing})")
    return study


def ensure_dataset(study: dict, folder: Path, workers: int) -> Path:
    from harmodt_hf.data.generation import generate_dataset

    generate_dataset(
        folder,
        study["tasks"],
        study["episodes_per_task"],
        seed=study.get("data_seed", 0),
        num_workers=workers,
        progress=True,
    )
    return folder


def run_one(study: dict, dataset: Path, arm: str, seed: int, out: Path, threads: int) -> dict:
    """Train one arm and seed in a fresh process (clean Accelerate state), saving the model every ``eval_every``
    steps; then evaluate every saved model in another fresh process; return the run's record."""
    if not _finished(out):
        out.mkdir(parents=True, exist_ok=True)
        values = {
            **study["train"],
            **{k: v for k, v in study["arms"][arm].items() if k != "seeds"},
            "seed": seed,
            "dataset": str(dataset),
            "dataset_config": f"{study['tasks']}-{study['quality']}",
            "output_dir": str(out),
            "save_strategy": "steps",
            "save_steps": study["eval_every"],
            "save_only_model": True,
        }
        (out / "train.yaml").write_text(yaml.safe_dump(values))
        start = time.perf_counter()
        with (out / "train.log").open("w") as log:
            for command in (
                [sys.executable, str(REPO / "training" / "train.py"), "--config", str(out / "train.yaml")],
                [
                    sys.executable,
                    __file__,
                    "--evaluate-run",
                    str(out),
                    "--eval-episodes",
                    str(study["eval_episodes"]),
                    "--eval-workers",
                    str(study.get("eval_num_workers") or 0),
                    "--eval-tasks-at-once",
                    str(study.get("eval_tasks_at_once", 2)),
                ],
            ):
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env(threads))
        (out / "wall_time.json").write_text(json.dumps({"train_and_eval_s": time.perf_counter() - start}))
    return run_record(study, arm, seed, out)


def _finished(out: Path) -> bool:
    return (out / "wall_time.json").exists() and (out / "final" / "training_summary.json").exists()


def evaluate_run(out: Path, episodes: int, num_workers: int = 0, tasks_at_once: int = 2) -> None:
    """Evaluate the run's saved models (``checkpoint-*`` and ``final``) with the official protocol, on the GPU when
    there is one, ``tasks_at_once`` tasks at a time (all of a task's episodes run together: 500 simulators at once
    need ~12 GB), environments in ``num_workers`` processes (0: in this one); write ``eval_history.json``
    (``history``, ``last`` = the final model, ``best``)."""
    import torch

    from harmodt_hf import HarmoDTModel
    from harmodt_hf.evaluation import evaluate

    torch.set_num_threads(1)
    folders = sorted(out.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1])) + [out / "final"]
    history = []
    for folder in folders:
        model = HarmoDTModel.from_pretrained(folder).eval().to("cuda" if torch.cuda.is_available() else "cpu")
        step = json.loads((out / "final" / "training_summary.json").read_text())["max_steps"]
        step = int(folder.name.split("-")[1]) if folder.name.startswith("checkpoint-") else step
        if history and history[-1]["step"] == step:
            continue
        tasks, per_task = model.config.task_names, {}
        for start in range(0, len(tasks), tasks_at_once):
            results = evaluate(
                model,
                tasks=tasks[start : start + tasks_at_once],
                episodes_per_task=episodes,
                seed=0,
                num_workers=num_workers,
                stop_on_success=True,
            )
            per_task.update({task: entry["success_rate"] for task, entry in results["per_task"].items()})
        history.append(
            {"step": step, "mean_success_rate": float(np.mean(list(per_task.values()))), "per_task": per_task}
        )
        print(f"step {step}: mean success {history[-1]['mean_success_rate']:.3f}", flush=True)
    best = max(history, key=lambda e: e["mean_success_rate"])
    payload = {"last": history[-1], "best": best, "history": history, "episodes_per_task": episodes, "seed": 0}
    (out / "eval_history.json").write_text(json.dumps(payload, indent=2))


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def run_record(study: dict, arm: str, seed: int, out: Path) -> dict:
    """What results.json keeps of one run (success in %, shares of the mask as fractions)."""
    history = json.loads((out / "eval_history.json").read_text())
    summary = json.loads((out / "final" / "training_summary.json").read_text())
    last, evaluations = history["last"], history["history"]
    episodes = study["eval_episodes"]
    rates = np.array(list(last["per_task"].values()))
    moved_curve = [(r["step"], r["mask/moved_fraction"]) for r in summary["mask_history"] if "mask/moved_fraction" in r]
    return {
        "arm": arm,
        "seed": seed,
        "variant": summary["variant"],
        "mask_seed": summary.get("mask_seed"),
        "last_step": last["step"],
        "last_success": 100 * last["mean_success_rate"],
        "best_success": 100 * max(e["mean_success_rate"] for e in evaluations),
        "per_task_last": {task: 100 * rate for task, rate in last["per_task"].items()},
        "moved_fraction": summary.get("mean_moved_fraction"),
        "planned_moved_fraction": summary.get("planned_moved_fraction"),
        "episodes_per_task": episodes,
        # binomial standard error of this run's mean success over tasks, in points
        "last_success_se": 100 * float(np.sqrt((rates * (1 - rates)).sum() / episodes) / len(rates)),
        "curve": [(e["step"], 100 * e["mean_success_rate"]) for e in evaluations],
        "moved_curve": moved_curve,
        "train_and_eval_s": json.loads((out / "wall_time.json").read_text())["train_and_eval_s"],
    }


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``values`` (resampling seeds with replacement)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(records: list[dict], study: dict) -> tuple[dict, list[dict]]:
    """Per arm: mean/std/bootstrap interval of last and best success and of the share moved; paired differences of
    the last success for the ``compare`` pairs (same seeds), with 95 % bootstrap intervals over seeds."""
    resamples = study.get("bootstrap_resamples", 10_000)
    arms: dict[str, dict] = {}
    for arm in study["arms"]:
        rows = [r for r in records if r["arm"] == arm]
        if not rows:
            continue
        last = np.array([r["last_success"] for r in rows])
        moved = [r["moved_fraction"] for r in rows if r["moved_fraction"] is not None]
        tasks = list(rows[0]["per_task_last"])
        arms[arm] = {
            "seeds": [r["seed"] for r in rows],
            "last_mean": float(last.mean()),
            "last_std": float(last.std(ddof=1)) if len(rows) > 1 else 0.0,
            "last_ci95": bootstrap_interval(last, resamples),
            "best_mean": float(np.mean([r["best_success"] for r in rows])),
            "moved_fraction_mean": float(np.mean(moved)) if moved else None,
            "planned_moved_fraction": rows[0]["planned_moved_fraction"],
            "per_task_last_mean": {t: float(np.mean([r["per_task_last"][t] for r in rows])) for t in tasks},
            "se_per_run_max": float(max(r["last_success_se"] for r in rows)),
        }
    pairs = []
    for a, b in study.get("compare", []):
        by_seed = {r["seed"]: r["last_success"] for r in records if r["arm"] == b}
        common = [r["seed"] for r in records if r["arm"] == a and r["seed"] in by_seed]
        if not common:
            continue
        diff = np.array(
            [next(r["last_success"] for r in records if r["arm"] == a and r["seed"] == s) - by_seed[s] for s in common]
        )
        pairs.append(
            {
                "arm": a,
                "baseline": b,
                "seeds": common,
                "differences": diff.tolist(),
                "mean_difference": float(diff.mean()),
                "ci95": bootstrap_interval(diff, resamples),
                "arm_wins": int((diff > 0).sum()),
                "ties": int((diff == 0).sum()),
            }
        )
    return arms, pairs


def markdown(arms: dict, pairs: list[dict], records: list[dict], study: dict, command: str) -> str:
    tasks = list(next(iter(arms.values()))["per_task_last_mean"])
    lines = [
        f"Every number below comes from `{command}` (it trains and evaluates the runs that are missing, then writes "
        "this file, results.json and the figures; `--summarise-only` rewrites them from the finished runs).",
        "",
        f"Meta-World {study['tasks'].upper()} {study['quality']}, {study['eval_episodes']} evaluation episodes per "
        "task (evaluation seed 0), last checkpoint; success in %, mean over tasks.",
        "",
        "| arm | seeds | last: mean ± std | last: 95 % CI (bootstrap over seeds) | best (mean) | share of mask moved "
        "(planned / actual) | max SE of one run |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in arms.items():
        moved = (
            "–"
            if row["moved_fraction_mean"] is None
            else (f"{100 * (row['planned_moved_fraction'] or 0):.1f} % / {100 * row['moved_fraction_mean']:.1f} %")
        )
        lines.append(
            f"| {arm} | {len(row['seeds'])} | {row['last_mean']:.1f} ± {row['last_std']:.1f} | "
            f"[{row['last_ci95'][0]:.1f}, {row['last_ci95'][1]:.1f}] | {row['best_mean']:.1f} | {moved} | "
            f"{row['se_per_run_max']:.1f} |"
        )
    lines += [
        "",
        "Paired differences of the last success (same seeds: same initial weights, data order and masks):",
        "",
        "| comparison | seeds | mean difference (points) | 95 % CI | per seed | arm better in |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        per_seed = ", ".join(f"{d:+.1f}" for d in p["differences"])
        lines.append(
            f"| {p['arm']} − {p['baseline']} | {len(p['seeds'])} | {p['mean_difference']:+.1f} | "
            f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] | {per_seed} | {p['arm_wins']} of {len(p['seeds'])} |"
        )
    lines += [
        "",
        "Per task, last success (mean over seeds, %):",
        "",
        "| task | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for task in tasks:
        lines.append(
            f"| {task} | " + " | ".join(f"{row['per_task_last_mean'][task]:.0f}" for row in arms.values()) + " |"
        )
    lines += [
        "",
        "Per run, last success (%):",
        "",
        "| arm | " + " | ".join(f"seed {s}" for s in study["seeds"]) + " |",
        "|---|" + "---|" * len(study["seeds"]),
    ]
    for arm in arms:
        by_seed = {r["seed"]: r["last_success"] for r in records if r["arm"] == arm}
        lines.append(
            f"| {arm} | " + " | ".join(f"{by_seed[s]:.1f}" if s in by_seed else "–" for s in study["seeds"]) + " |"
        )
    return "\n".join(lines) + "\n"


def save_over_steps(fig, ax, ylabel: str, title: str, path: Path) -> None:
    """Label a figure over training steps (grid, legend), save it and close it."""
    ax.set_xlabel("training steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt  # after plot() chose the Agg backend

    plt.close(fig)


def plot(arms: dict, records: list[dict], folder: Path, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.5))
    for i, arm in enumerate(names):
        points = [r["last_success"] for r in records if r["arm"] == arm]
        ax.scatter(
            np.full(len(points), i) + np.linspace(-0.12, 0.12, len(points)), points, s=18, color="0.45", zorder=3
        )
        low, high = arms[arm]["last_ci95"]
        ax.errorbar(
            i,
            arms[arm]["last_mean"],
            yerr=[[arms[arm]["last_mean"] - low], [high - arms[arm]["last_mean"]]],
            fmt="o",
            color="C3",
            capsize=6,
            markersize=8,
            zorder=4,
        )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("mean success over tasks, last checkpoint (%)")
    ax.set_title("Success per arm: mean with 95 % bootstrap CI (red), seeds (grey)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / f"success_by_arm{suffix}.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(names):
        curves = [r["moved_curve"] for r in records if r["arm"] == arm and r["moved_curve"]]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        mean = np.mean([[100 * m for _, m in c] for c in curves], axis=0)
        ax.plot([0, *steps], [0, *mean], marker=".", color=f"C{i}", label=arm)
    save_over_steps(
        fig,
        ax,
        "share of each task's initial mask moved (%)",
        "Mask change over training (mean over tasks and seeds)",
        folder / f"moved_share{suffix}.png",
    )

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(names):
        for j, record in enumerate(r for r in records if r["arm"] == arm):
            steps, values = zip(*record["curve"], strict=True)  # runs may be evaluated at different steps
            ax.plot(steps, values, marker="o", lw=1, alpha=0.6, color=f"C{i}", label=arm if j == 0 else None)
    save_over_steps(
        fig,
        ax,
        "mean success over tasks (%)",
        "Success during training, one line or point per run (seed)",
        folder / f"success_curves{suffix}.png",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="study YAML (see benchmarks/configs/)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--evaluate-run", type=Path, help=argparse.SUPPRESS)  # internal: evaluate one run's models
    parser.add_argument("--eval-episodes", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--eval-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--eval-tasks-at-once", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, default=None, help="existing dataset folder (default: generate)")
    parser.add_argument("--workers", type=int, default=2, help="processes for data generation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    parser.add_argument("--summarise-only", action="store_true", help="only summarise the finished runs")
    args = parser.parse_args()
    if args.evaluate_run:
        evaluate_run(args.evaluate_run, args.eval_episodes, args.eval_workers, args.eval_tasks_at_once)
        return
    if args.config is None or args.output is None:
        parser.error("--config and --output are required")
    study = load_study(args.config)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dataset = args.dataset or (args.output / "data" if args.summarise_only else None)
    dataset = dataset or ensure_dataset(study, args.output / "data", args.workers)
    # Masked arms first, seed-major (every masked arm of a seed finishes before the next seed starts, so a study cut
    # short stays paired), then the unmasked baselines.
    masked = [a for a, settings in study["arms"].items() if settings["variant"].startswith("harmodt")]
    others = [a for a in study["arms"] if a not in masked]
    jobs = [
        (arm, seed)
        for group in (masked, others)
        for seed in study["seeds"]
        for arm in group
        if seed in study["arms"][arm].get("seeds", study["seeds"])
    ]
    planned = len(jobs)
    if args.summarise_only:
        jobs = [(a, s) for a, s in jobs if _finished(args.output / f"{a}_seed{s}")]

    def job(item: tuple[str, int]) -> dict:
        arm, seed = item
        out = args.output / f"{arm}_seed{seed}"
        print(f"[{time.perf_counter() - start:7.0f}s] {arm} seed {seed} → {out}", flush=True)
        record = run_one(study, dataset, arm, seed, out, args.threads)
        print(
            f"[{time.perf_counter() - start:7.0f}s] {arm} seed {seed}: last {record['last_success']:.1f} %", flush=True
        )
        return record

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        records = list(pool.map(job, jobs))
    arms, pairs = summarise(records, study)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    suffix = "" if len(records) == planned else "_partial"
    command = (
        f"python benchmarks/reproduce.py --config {args.config} --output {args.output.name} --workers {args.workers} "
        f"--threads {args.threads} --parallel {args.parallel}"
    )
    payload = {
        "study": study,
        "commit": commit.stdout.strip(),
        "runs": records,
        "arms": arms,
        "paired": pairs,
        "wall_time_s": time.perf_counter() - start,
    }
    (args.output / f"results{suffix}.json").write_text(json.dumps(payload, indent=2))
    text = markdown(arms, pairs, records, study, command)
    (args.output / f"results{suffix}.md").write_text(text)
    plot(arms, records, args.output, suffix)
    print(text)
    print(f"wall time {payload['wall_time_s']:.0f} s; results in {args.output}")


if __name__ == "__main__":
    main()
