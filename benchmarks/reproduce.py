"""Train and evaluate HarmoDT-F, HarmoDT-M, HarmoDT-R, Prompt-DT and MTDT on the same data, budget and evaluation.

    python benchmarks/reproduce.py --config benchmarks/configs/mt10_cpu.yaml --output runs/study-mt10

For each seed and variant: ``training/train.py``'s code path with the study's YAML (model size, steps, batch) and a
Meta-World evaluation every ``eval_every`` steps (evaluation seed fixed and separate from the training seeds; nothing
is tuned on it). Writes ``results.json``, ``results.md`` (mean ± std over seeds of the last and the best evaluation)
and ``success_curves.png`` (mean success against training steps) into the output folder. Finished runs (their
``eval_history.json`` exists) are skipped, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

STUDY_KEYS = ("tasks", "quality", "episodes_per_task", "data_seed", "variants", "seeds", "eval_every",
              "eval_episodes", "eval_num_workers", "train")  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def load_study(path: Path) -> dict:
    study = yaml.safe_load(path.read_text())
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {path}; known: {STUDY_KEYS}")
    return study


def ensure_dataset(study: dict, folder: Path, workers: int) -> Path:
    from harmodt_hf.data.generation import generate_dataset

    generate_dataset(folder, study["tasks"], study["episodes_per_task"], seed=study.get("data_seed", 0),
                     num_workers=workers, progress=True)  # fmt: skip
    return folder


def run_one(study: dict, dataset: Path, variant: str, seed: int, out: Path, threads: int) -> dict:
    """Train one variant/seed in a fresh process (clean Accelerate state); return its evaluation history."""
    history_file = out / "eval_history.json"
    if history_file.exists():
        history = json.loads(history_file.read_text())
        if "train_wall_time_s" in history:  # written by run_one once the run has finished
            return history
    train_yaml = out / "train.yaml"
    out.mkdir(parents=True, exist_ok=True)
    values = {
        **study["train"],
        "variant": variant,
        "seed": seed,
        "dataset": str(dataset),
        "dataset_config": f"{study['tasks']}-{study['quality']}",
        "output_dir": str(out),
        "eval_every": study["eval_every"],
        "eval_episodes": study["eval_episodes"],
        "eval_num_workers": study.get("eval_num_workers"),
    }
    train_yaml.write_text(yaml.safe_dump(values))
    env_prefix = [sys.executable, str(REPO / "training" / "train.py"), "--config", str(train_yaml)]
    start = time.perf_counter()
    log = (out / "train.log").open("w")
    subprocess.run(env_prefix, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                   env={**_env(threads)})  # fmt: skip
    history = json.loads(history_file.read_text())
    history["train_wall_time_s"] = time.perf_counter() - start
    history_file.write_text(json.dumps(history, indent=2))
    return history


def _env(threads: int) -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Mean ± std over seeds of the last and best mean success (in %), and the mean curve per variant."""
    table = {}
    for variant, by_seed in runs.items():
        last = [100 * h["last"]["mean_success_rate"] for h in by_seed.values()]
        best = [100 * h["best"]["mean_success_rate"] for h in by_seed.values()]
        steps = [r["step"] for r in next(iter(by_seed.values()))["history"]]
        curve = np.mean([[100 * r["mean_success_rate"] for r in h["history"]] for h in by_seed.values()], axis=0)
        per_task_last: dict[str, list[float]] = {}
        for h in by_seed.values():
            for task, rate in h["last"]["per_task"].items():
                per_task_last.setdefault(task, []).append(100 * rate)
        table[variant] = {
            "last_mean": float(np.mean(last)), "last_std": float(np.std(last)),
            "best_mean": float(np.mean(best)), "best_std": float(np.std(best)),
            "last_by_seed": dict(zip(map(str, by_seed), last, strict=True)),
            "best_by_seed": dict(zip(map(str, by_seed), best, strict=True)),
            "curve_steps": steps, "curve_mean": curve.tolist(),
            "per_task_last_mean": {t: float(np.mean(v)) for t, v in per_task_last.items()},
            "train_wall_time_s": float(np.mean([h.get("train_wall_time_s", np.nan) for h in by_seed.values()])),
        }  # fmt: skip
    return table


def markdown_table(table: dict, study: dict) -> str:
    lines = [
        f"Meta-World {study['tasks'].upper()} {study['quality']}, seeds {study['seeds']}, "
        f"{study['eval_episodes']} evaluation episodes per task (mean success %, mean ± std over seeds)",
        "",
        "| variant | seeds | last | best | mean train+eval time per run (s) |",
        "|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        lines.append(
            f"| {variant} | {len(row['last_by_seed'])} | {row['last_mean']:.1f} ± {row['last_std']:.1f} | "
            f"{row['best_mean']:.1f} ± {row['best_std']:.1f} | {row['train_wall_time_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, row in table.items():
        ax.plot(row["curve_steps"], row["curve_mean"], marker="o", label=variant)
    ax.set_xlabel("training steps")
    ax.set_ylabel("mean success rate over tasks (%)")
    ax.set_title("Success during training (mean over seeds)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="study YAML (see benchmarks/configs/)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=None, help="existing dataset folder (default: generate)")
    parser.add_argument("--workers", type=int, default=2, help="processes for data generation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    parser.add_argument("--summarise-only", action="store_true", help="only summarise the finished runs")
    args = parser.parse_args()
    study = load_study(args.config)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dataset = args.dataset or (args.output / "data" if args.summarise_only else None)
    dataset = dataset or ensure_dataset(study, args.output / "data", args.workers)
    jobs = [(variant, seed) for seed in study["seeds"] for variant in study["variants"]]
    if args.summarise_only:  # report the runs finished so far (e.g. while the study is still running)
        finished = [(v, s, args.output / f"{v}_seed{s}" / "eval_history.json") for v, s in jobs]
        jobs = [(v, s) for v, s, f in finished if f.exists() and "train_wall_time_s" in json.loads(f.read_text())]

    def job(item: tuple[str, int]) -> dict:
        variant, seed = item
        out = args.output / f"{variant}_seed{seed}"
        print(f"[{time.perf_counter() - start:7.0f}s] {variant} seed {seed} → {out}", flush=True)
        history = run_one(study, dataset, variant, seed, out, args.threads)
        last = history["last"]["mean_success_rate"]
        print(f"[{time.perf_counter() - start:7.0f}s] {variant} seed {seed}: last mean success {last:.2f}", flush=True)
        return history

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        histories = list(pool.map(job, jobs))
    runs: dict[str, dict[int, dict]] = {}
    for (variant, seed), history in zip(jobs, histories, strict=True):
        runs.setdefault(variant, {})[seed] = history
    table = summarise(runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    payload = {"study": study, "results": table, "commit": commit.stdout.strip(),
               "wall_time_s": time.perf_counter() - start}  # fmt: skip
    suffix = "_partial" if args.summarise_only else ""
    (args.output / f"results{suffix}.json").write_text(json.dumps(payload, indent=2))
    (args.output / f"results{suffix}.md").write_text(markdown_table(table, study))
    plot_curves(table, args.output / f"success_curves{suffix}.png")
    print(markdown_table(table, study))
    print(f"total wall time {payload['wall_time_s']:.0f} s; results in {args.output}")


if __name__ == "__main__":
    main()
