"""Held-out tasks for trained MT10 models (issue #19): zero-shot and few-shot success on tasks the models never saw,
and the seen tasks' success before and after adapting.

    python benchmarks/new_tasks_study.py --harmodt /work/study/run/harmodt-f-15_seed1/final \
        --prompt-dt /work/newtask_study/prompt-dt_seed1/final --demos /work/newtask_study/heldout_data \
        --output /work/newtask_study/results.json

Arms: ``harmodt-f-merged`` (the HarmoDT-F model, new tasks with the merged mask), ``harmodt-f-ones`` (the same model,
all-ones masks) and ``prompt-dt`` (no masks). For every arm and every number of demonstrations N in ``--shots``, the
held-out tasks are added to a fresh copy of the model with a prompt and statistics from their last N demonstrations
(the generator's noise-free expert episodes); with N = 1 nothing is trained (zero-shot), with N > 1 the model is
fine-tuned on those N episodes per task for ``--adapt-steps`` steps in each mode of ``--modes`` (``all``: every weight
under the new tasks' masks; ``prompt``: the new tasks' prompts only, which leaves the seen tasks bit-identical — by
construction and by tests/test_adaptation.py — so they are not re-evaluated). Held-out success: ``--heldout-episodes``
episodes per task (goals 0.. of MT1(task, seed 0)); seen tasks: ``--seen-episodes`` per task before and after each
``all`` adaptation. Results are written after every evaluation, and a rerun skips what is done.
``--table a.json b.json`` prints the markdown table of finished results files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from harmodt_hf import HarmoDTModel, HarmoDTTrainingArguments
from harmodt_hf.evaluation.rollouts import evaluate
from harmodt_hf.training.adaptation import adapt, final_loss
from harmodt_hf.training.demonstrations import add_task_from_demonstrations

HELD_OUT = "reach-wall-v3,button-press-topdown-wall-v3,plate-slide-v3"


def table(paths: list[str]) -> str:
    """Markdown: one row per arm, shots and mode; held-out success per task and mean, seen success before/after."""
    rows, before = [], {}
    for path in paths:
        for key, value in json.loads(Path(path).read_text())["runs"].items():
            if key.startswith("seen-before/"):
                before[key.split("/", 1)[1]] = value["mean"]
            else:
                rows.append(value)
    tasks = list(rows[0]["held_out"]["per_task"]) if rows else []
    head = ["arm", "model run", "demos", "adaptation", *tasks, "held-out mean", "seen before", "seen after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        run = Path(row["model"]).parent.name
        seen = before.get(run)
        after = row.get("seen_after", {}).get("mean")
        cells = [row["arm"], run, str(row["shots"]), row["mode"]]
        cells += [f"{100 * row['held_out']['per_task'][t]:.0f}" for t in tasks]
        unchanged = "= before (bit-identical)" if row["mode"] in ("zero-shot", "prompt") else ""
        cells.append(f"{100 * row['held_out']['mean']:.1f}")
        cells.append(f"{100 * seen:.0f}" if seen is not None else "")
        cells.append(f"{100 * after:.0f}" if after is not None else unchanged)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harmodt", required=True, help="trained HarmoDT-F model folder")
    parser.add_argument("--prompt-dt", default=None, help="trained Prompt-DT model folder (arm skipped if absent)")
    parser.add_argument("--demos", required=True, help="dataset folder with the held-out tasks' episodes")
    parser.add_argument("--tasks", default=HELD_OUT, help="held-out tasks (comma-separated)")
    parser.add_argument("--arms", default="harmodt-f-merged,harmodt-f-ones,prompt-dt")
    parser.add_argument("--shots", default="1,5,20", help="demonstrations per task (1: zero-shot, no training)")
    parser.add_argument("--modes", default="all", help="adaptation modes for N > 1 (all, prompt, embeddings)")
    parser.add_argument("--adapt-steps", type=int, default=200)
    parser.add_argument("--adapt-lr", type=float, default=1e-4)
    parser.add_argument("--adapt-batch", type=int, default=18, help="segments per step (all_tasks: a multiple of T)")
    parser.add_argument("--heldout-episodes", type=int, default=20)
    parser.add_argument("--seen-episodes", type=int, default=10)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--adapt-seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="env worker processes (0: in this process)")
    parser.add_argument("--output", required=True, help="results JSON (resumed if it exists)")
    return parser.parse_args(argv)


def success(results: dict) -> dict:
    per_task = {task: entry["success_rate"] for task, entry in results["per_task"].items()}
    return {"mean": results["mean_success_rate"], "per_task": per_task, "episodes": results["episodes_per_task"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output)
    record = json.loads(output.read_text()) if output.exists() else {"runs": {}}
    record["settings"] = {k: v for k, v in vars(args).items() if k != "output"}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    folders = {"harmodt-f-merged": args.harmodt, "harmodt-f-ones": args.harmodt, "prompt-dt": args.prompt_dt}
    masks = {"harmodt-f-merged": "merged", "harmodt-f-ones": "ones", "prompt-dt": None}

    def save() -> None:
        output.write_text(json.dumps(record, indent=2))

    def run_eval(model, eval_tasks, episodes) -> dict:
        start = time.perf_counter()
        results = evaluate(model, eval_tasks, episodes, seed=args.eval_seed, num_workers=args.num_workers,
                           torch_threads=1)  # fmt: skip
        return {**success(results), "wall_s": round(time.perf_counter() - start, 1)}

    for arm in [a.strip() for a in args.arms.split(",")]:
        if not folders[arm] or not Path(folders[arm]).exists():
            print(f"{arm}: no model folder, skipped")
            continue
        base = HarmoDTModel.from_pretrained(folders[arm])
        seen = list(base.config.task_names)
        seen_key = f"seen-before/{Path(folders[arm]).parent.name}"
        if seen_key not in record["runs"]:
            record["runs"][seen_key] = run_eval(base, seen, args.seen_episodes)
            save()
        for shots in [int(s) for s in args.shots.split(",")]:
            for mode in ["zero-shot"] if shots == 1 else [m.strip() for m in args.modes.split(",")]:
                key = f"{arm}/{shots}/{mode}"
                if key in record["runs"]:
                    continue
                model = HarmoDTModel.from_pretrained(folders[arm])
                demos = [
                    add_task_from_demonstrations(model, task, args.demos, last=shots, mask=masks[arm]) for task in tasks
                ]
                entry = {"arm": arm, "shots": shots, "mode": mode, "model": folders[arm]}
                if mode != "zero-shot":
                    torch.manual_seed(args.adapt_seed)
                    with tempfile.TemporaryDirectory() as scratch:
                        training = HarmoDTTrainingArguments(
                            output_dir=scratch, max_steps=args.adapt_steps, learning_rate=args.adapt_lr,
                            per_device_train_batch_size=args.adapt_batch, task_sampling="all_tasks",
                            lr_scheduler_type="constant", weight_decay=1e-4, max_grad_norm=0.25, mask_updates=False,
                            logging_steps=max(1, args.adapt_steps // 4), save_strategy="no", use_cpu=True,
                            report_to="none", disable_tqdm=True, seed=args.adapt_seed, dataloader_num_workers=0,
                        )  # fmt: skip
                        start = time.perf_counter()
                        trainer = adapt(model, demos, training, train=mode)
                        entry["adapt_s"] = round(time.perf_counter() - start, 1)
                        entry["final_loss"] = final_loss(trainer)
                entry["held_out"] = run_eval(model, tasks, args.heldout_episodes)
                if mode in ("all", "embeddings"):
                    entry["seen_after"] = run_eval(model, seen, args.seen_episodes)
                record["runs"][key] = entry
                save()
                print(key, json.dumps({k: v for k, v in entry.items() if k in ("held_out", "seen_after")}))
    return record


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2:]))
    else:
        main()
