"""Batched evaluation vs the official-style sequential loop, and env-steps/s vs the simulator alone.

    python benchmarks/bench_eval.py --episodes 3 --max-steps 50 --threads 1
    python benchmarks/bench_eval.py --episodes 3 --max-steps 50 --threads 1 --precision bf16
    python benchmarks/bench_eval.py --device cuda --episodes 50 --max-steps 500 --precision bf16 --sequential-episodes 1
    python benchmarks/bench_eval.py --model runs/main_job/model --episodes 3 --max-steps 500 --stop-on-success

Model: paper size (HarmoDTConfig defaults: 6 layers, d=256, K=20, prompt 5, harmony masks) for the ``--tasks`` (MT10
by default), random weights and random stored prompts; or a trained model folder (``--model``, all its tasks unless
``--tasks`` picks some). Episodes: tasks x ``--episodes``, ``--max-steps`` steps each. Baseline: one episode after
another, a batch-1 forward per step over the prompt and all context tokens (HarmoDTPolicy with one slot,
``cache_prompt=False`` and ``last_action_only=False``, as the official Prompt-DT loop does), on masked weights built
once (the official evaluation masks the model once before its episodes; baselines before 2026-11-26 rebuilt them at
every forward, ~7 ms of a ~18 ms step on CPU, which inflated the printed ratios by ~1.5x), every episode run to
``--max-steps`` as officially. The batched run is ``harmodt_hf.evaluation.evaluate`` (prompt keys/values encoded once
per episode, only what the last action needs computed, env stepping pipelined with the policy when there are >= 2 env
workers); with ``--stop-on-success`` it ends each episode at its first success, which gives the same success rates
(success = success at any step) with fewer steps, so the printed agreement of successes matters there. Both wall
times include building the environments: the baseline builds each task's ``MT1`` once, as the official code does;
the batched runs read the goal lists from harmodt-hf's on-disk cache (``harmodt_hf.envs.goal_cache``, filled by the
warm-up run; the first evaluation on a machine builds them, ~0.5 s per task). The actions of both runs are compared
over the steps both ran (max absolute difference). Then the same envs are stepped with zero actions in one process
(the simulator's own limit). Torch uses ``--threads`` threads in every run (1: bit-identical actions; robust on a
machine whose cores are shared).

``--precision bf16`` also times the batched runs with ``evaluate(precision="bf16")`` (bf16 autocast); the fp32
batched run and the sequential baseline (always the official fp32 batch-1 loop) stay, so the speed-ups of both
precisions are printed. bf16 actions differ from the fp32 baseline's by reduced-precision rounding (the printed
difference is expected to be non-zero). fp32 batched actions differ from the baseline's by float rounding only
(~5e-7 per forward from encoding the prompt apart), which the simulator can amplify over an episode; the test suite
checks that batched and one-episode-at-a-time evaluation with the same policy give identical actions.
``--sequential-episodes N`` times the baseline on the first N episodes of each task only and extrapolates its wall
time per env step to all episodes (every episode has exactly ``--max-steps`` steps; the per-task MT1 goal list is
built once per task either way and counted once): for runs where the sequential loop would take too long.
``--device cuda`` puts the model on the GPU (the environments stay on the CPU). ``--no-in-process`` skips the
batched run with in-process environments (long for many episodes). The zero-action rate is measured on the
baseline's episodes.
"""

from __future__ import annotations

import argparse
import os
import time

import metaworld
import numpy as np
import torch

from harmodt_hf import HarmoDTConfig, HarmoDTModel
from harmodt_hf.envs.factory import forget_task_goals, make_env
from harmodt_hf.evaluation.rollouts import PRECISIONS, HarmoDTPolicy, episode_reset_seed, evaluate
from harmodt_hf.tasks import resolve_tasks


def paper_model(tasks: list[str], seed: int = 0, device: str = "cpu") -> HarmoDTModel:
    torch.manual_seed(seed)
    model = HarmoDTModel(HarmoDTConfig(task_names=list(tasks))).eval()
    config, g = model.config, torch.Generator().manual_seed(seed)
    t, p = config.num_tasks, config.prompt_length
    model.set_task_prompts(
        dict(
            states=torch.randn(t, p, config.state_dim, generator=g),
            actions=torch.rand(t, p, config.act_dim, generator=g) * 2 - 1,
            returns_to_go=torch.rand(t, p, 1, generator=g) * 4,
            timesteps=torch.arange(p).repeat(t, 1),
            attention_mask=torch.ones(t, p, dtype=torch.long),
        )
    )
    return model.to(device)


def sequential(model, tasks, episodes: int, seed: int, max_steps: int) -> tuple[float, float, dict, dict]:
    """The official-style loop: one episode at a time, batch-1 forward per step, every episode ``max_steps`` long.

    Returns the wall time of the per-task setup (building each task's MT1 goal list, once per task), the wall time of
    the episodes themselves (env construction included), the actions and the successes (at any step).
    """
    setup = episodes_time = 0.0
    actions, successes = {}, {}
    # The official evaluation masks the weights once (apply_final_mask + load_state_dict), then runs plain forwards:
    # HarmoDTPolicy builds the masked weights once too (model.masked_weights_cached), not at every forward.
    for task in tasks:
        start = time.perf_counter()
        bench = metaworld.MT1(task, seed=seed)  # built once per task, as officially (no goal cache)
        setup += time.perf_counter() - start
        start = time.perf_counter()
        for e in range(episodes):
            # The prompt tokens in every forward and the full forward over the window, as officially.
            policy = HarmoDTPolicy(model, cache_prompt=False, last_action_only=False)
            policy.reset([task])
            env = bench.train_classes[task]()  # what make_env(task, e, seed) builds
            env.set_task(bench.train_tasks[e])
            obs, _ = env.reset(seed=episode_reset_seed(seed, task, e))
            reward, taken, success = None, [], False
            for _ in range(max_steps):
                action = policy.act(obs[None], None if reward is None else [reward])[0]
                taken.append(action)
                obs, reward, _, _, info = env.step(action)
                success |= bool(info["success"])
            actions[(task, e)], successes[(task, e)] = np.array(taken), success
            env.close()
        episodes_time += time.perf_counter() - start
    model.cache_masked_weights(False)  # drop the masked copies
    return setup, episodes_time, actions, successes


def zero_action_steps(tasks, episodes: int, seed: int, max_steps: int) -> tuple[float, int]:
    """Wall time of stepping the same envs with zero actions (construction excluded), one process."""
    envs = []
    for task in tasks:
        for e in range(episodes):
            env = make_env(task, e, seed)
            env.reset(seed=episode_reset_seed(seed, task, e))
            envs.append(env)
    zero = np.zeros(4)
    start = time.perf_counter()
    for _ in range(max_steps):
        for env in envs:
            env.step(zero)
    elapsed = time.perf_counter() - start
    for env in envs:
        env.close()
    return elapsed, len(envs) * max_steps


def load_model(args: argparse.Namespace) -> tuple[HarmoDTModel, list[str]]:
    """The trained model of ``--model`` (its tasks, or ``--tasks`` among them), or a random paper-size one."""
    asked = None if args.tasks is None else resolve_tasks(args.tasks.split(",") if "," in args.tasks else args.tasks)
    if args.model is None:
        return paper_model(asked, device=args.device), asked
    model = HarmoDTModel.from_pretrained(args.model).to(args.device).eval()
    names = model.config.task_names
    tasks = names if asked is None else asked
    unknown = [task for task in tasks if task not in names]
    if unknown:
        raise SystemExit(f"--tasks {unknown} are not tasks of the model {args.model} ({names})")
    return model, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="also time the batched runs at this precision (the fp32 batched run and the fp32 baseline stay)",
    )
    parser.add_argument(
        "--sequential-episodes",
        type=int,
        default=None,
        help="time the sequential baseline on the first N episodes per task and extrapolate per env step",
    )
    parser.add_argument("--device", default="cpu", help="model device (cpu, cuda, ...)")
    parser.add_argument(
        "--tasks",
        default=None,
        help="task set (mt5, mt10, mt30, mt50) or comma-separated names (default: mt10, or all of --model's tasks)",
    )
    parser.add_argument("--model", default=None, help="a trained model folder (default: random paper-size weights)")
    parser.add_argument(
        "--stop-on-success",
        action="store_true",
        help="batched runs end each episode at its first success (the baseline runs every step, as officially)",
    )
    parser.add_argument(
        "--unpipelined",
        action="store_true",
        help="also time the batched run at --precision with pipeline=False (env stepping not overlapped)",
    )
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the batched run with the environments in the main process",
    )
    args = parser.parse_args()
    seq_episodes = args.episodes if args.sequential_episodes is None else args.sequential_episodes
    if not 1 <= seq_episodes <= args.episodes:
        parser.error(f"--sequential-episodes must be in [1, --episodes={args.episodes}], got {seq_episodes}")
    if args.model is None and args.tasks is None:
        args.tasks = "mt10"
    torch.set_num_threads(args.threads)
    model, tasks = load_model(args)
    n_env_steps = len(tasks) * args.episodes * args.max_steps  # the full protocol: every episode max_steps long
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, {args.device}")
    shape = f"{len(tasks)} tasks x {args.episodes} episodes x {args.max_steps} steps"
    what = f"model {args.model}" if args.model else "paper-size model, random weights"
    print(f"{shape} = {n_env_steps} env steps, {what}, batched stop_on_success={args.stop_on_success}")
    precisions = list(dict.fromkeys(["fp32", args.precision]))

    kwargs = dict(tasks=tasks, episodes_per_task=args.episodes, seed=args.seed, stop_on_success=args.stop_on_success)
    # Warm-up: imports, first forwards, and the env workers' forkserver (started once per process).
    for precision in precisions:
        evaluate(model, **kwargs, max_steps=2, num_workers=args.num_workers, precision=precision)
    # More batched runs, at --precision only: label -> evaluate overrides.
    extra_runs: dict[str, dict] = {}
    if args.unpipelined:
        extra_runs["not pipelined"] = dict(num_workers=args.num_workers, pipeline=False)
    if args.in_process:
        extra_runs["envs in-process"] = dict(num_workers=0)
    batched, actions, successes, steps_run = {}, {}, {}, {}
    variants: dict[str, dict[str, float]] = {label: {} for label in extra_runs}  # label -> precision -> wall time
    for precision in precisions:
        forget_task_goals()  # every timed run builds its environments (goal lists read from the disk cache)
        results = evaluate(
            model, **kwargs, max_steps=args.max_steps, num_workers=args.num_workers, record_actions=True,
            precision=precision,
        )  # fmt: skip
        assert results["precision"] == precision
        assert args.stop_on_success or results["env_steps"] == n_env_steps
        batched[precision], workers = results["wall_time_s"], results["num_workers"]
        steps_run[precision] = results["env_steps"]
        per_task = results["per_task"]
        actions[precision] = {
            (task, e): np.array(per_task[task]["actions"][e], dtype=np.float32)
            for task in tasks
            for e in range(seq_episodes)
        }
        successes[precision] = {(t, e): per_task[t]["successes"][e] for t in tasks for e in range(args.episodes)}
        piped = " (pipelined)" if results["pipeline"] else ""
        setup, steps = results["env_setup_s"], batched[precision] - results["env_setup_s"]
        print(
            f"batched evaluate {precision}, {workers} env workers{piped}: {batched[precision]:.2f} s "
            f"({setup:.2f} s building the environments, then {1000 * steps / args.max_steps:.1f} ms per step of the "
            f"longest episode), {results['env_steps']} env steps, mean success {results['mean_success_rate']:.3f}; "
            f"{results['policy_s']:.2f} s in the policy, {results['env_wait_s']:.2f} s waiting for env steps",
            flush=True,
        )
        for label, overrides in extra_runs.items() if precision == args.precision else ():
            forget_task_goals()
            run = evaluate(model, **kwargs, max_steps=args.max_steps, precision=precision, **overrides)
            variants[label][precision] = run["wall_time_s"]
            print(f"batched evaluate {precision}, {label}: {run['wall_time_s']:.2f} s", flush=True)
    forget_task_goals()
    seq_setup, seq_episodes_time, seq_actions, seq_successes = sequential(
        model, tasks, seq_episodes, args.seed, args.max_steps
    )
    seq_measured = seq_setup + seq_episodes_time
    seq_steps = len(tasks) * seq_episodes * args.max_steps
    # Per-task setup once, the episodes scaled per env step (= seq_measured when every episode ran).
    seq_time = seq_setup + seq_episodes_time * n_env_steps / seq_steps
    extrapolated = seq_steps != n_env_steps
    print(f"sequential loop ({seq_episodes} episode(s) per task): {seq_measured:.2f} s", flush=True)
    max_diff = {  # over the steps both ran (a batched episode may have stopped at its first success)
        precision: max(
            float(np.abs(actions[precision][key] - seq_actions[key][: len(actions[precision][key])]).max())
            for key in seq_actions
        )
        for precision in precisions
    }
    # The simulator alone, on the baseline's episodes (a rate: env steps/s of one process).
    sim_time, sim_steps = zero_action_steps(tasks, seq_episodes, args.seed, args.max_steps)
    assert sim_steps == seq_steps

    def row(label: str, seconds: float, steps: int = n_env_steps) -> None:
        print(f"{label:<48} {seconds:8.2f} s  {steps / seconds:8.1f} env steps/s")

    print()
    row("sequential loop, fp32 (batch-1 forward per step)", seq_time)
    if extrapolated:
        print(
            f"  ^ EXTRAPOLATED: measured {seq_measured:.2f} s on the first {seq_episodes} of {args.episodes} episodes "
            f"per task: {seq_setup:.2f} s per-task setup (MT1 goal lists, counted once) + {seq_episodes_time:.2f} s "
            f"for {seq_steps} env steps, scaled per env step to all {n_env_steps}"
        )
    for precision in precisions:
        row(f"batched evaluate {precision}, {workers} env workers", batched[precision], steps_run[precision])
        for label, times in variants.items():
            if precision in times:
                row(f"batched evaluate {precision}, {label}", times[precision], steps_run[precision])
    row("zero-action env stepping (1 process)", sim_time, sim_steps)
    note = " [sequential time extrapolated]" if extrapolated else ""
    for precision in precisions:
        line = f"speed-up batched {precision} / sequential fp32: {seq_time / batched[precision]:.2f}x"
        for label, times in variants.items():
            if precision in times:
                line += f" ({label}: {seq_time / times[precision]:.2f}x)"
        print(line + note)
    fastest = min(precisions, key=batched.get)
    fraction = steps_run[fastest] / batched[fastest] / (sim_steps / sim_time)
    print(f"batched env-steps/s as a fraction of the simulator alone (1 process): {fraction:.3f}")
    for precision in precisions:
        expected = (
            "float rounding from the prompt encoded apart, amplified by the simulator"
            if precision == "fp32"
            else "NOT expected to be 0: reduced-precision rounding vs the fp32 baseline"
        )
        print(
            f"max |action difference| batched {precision} vs sequential fp32 over all steps of the baseline's "
            f"episodes: {max_diff[precision]:.3g} ({expected})"
        )
        agree = sum(successes[precision][key] == seq_successes[key] for key in seq_successes)
        print(
            f"success (any step) batched {precision} vs sequential fp32 on the baseline's episodes: {agree} of "
            f"{len(seq_successes)} episodes agree; success rate {np.mean(list(successes[precision].values())):.3f} "
            f"batched (all episodes), {np.mean(list(seq_successes.values())):.3f} sequential"
        )


if __name__ == "__main__":
    main()
