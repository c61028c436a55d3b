"""Acting and evaluating: :class:`HarmoDTPolicy` (many episodes at once) and batched Meta-World rollouts.

Protocol of :func:`evaluate` (the official one): episode ``e`` of a task uses goal ``e`` of ``MT1(task, seed)``,
lasts at most 500 steps, and succeeds when ``info['success']`` is set at any step; the return-to-go starts at the
model config's target return for the task and is decremented by every reward. All running episodes of all tasks are
advanced together with one policy call per step, while the environments step in worker processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tasks import ACTION_DIM, EPISODE_LENGTH, MT50, OBSERVATION_DIM, make_env, resolve_tasks

GOALS_PER_TASK = 50  # len(MT1(task).train_tasks)
STD_EPSILON = 1e-6  # states are normalised as (obs - mean) / (std + 1e-6)

EnvFactory = Callable[[str, int, int], Any]  # (task name, goal index, benchmark seed) -> gymnasium env


# ================================================================================================ policy
class HarmoDTPolicy:
    """A stateful HarmoDT policy for many episodes at once, of any mix of tasks.

    Each episode lives in a *slot*; the policy keeps per slot the context window of the last ``K`` steps (left-padded
    with zeros and mask 0), the timestep, the return-to-go and the task's prompt and normalisation. Everything comes
    from the model's config: state mean/std, ``target_returns``, ``return_scale`` and the stored prompts.

    The policy does not change the model's train/eval mode: call ``model.eval()`` first (``evaluate`` does).

    Example::

        policy = HarmoDTPolicy(model)
        policy.reset(["reach-v3", "push-v3"])
        actions = policy.act(observations)                # first step: no reward yet
        actions = policy.act(observations, rewards)       # rewards received after the previous actions
        actions = policy.act(observations[:1], rewards[:1], active=[1])   # slot 0 has ended: only slot 1 runs
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._allocate(0)

    @property
    def num_slots(self) -> int:
        return int(self._task_ids.numel())

    @property
    def task_ids(self) -> list[int]:
        """Task id of every slot."""
        return self._task_ids.tolist()

    @property
    def steps(self) -> list[int]:
        """Steps already taken in every slot's episode (the timestep of its next observation)."""
        return self._steps.tolist()

    def _allocate(self, n: int) -> None:
        config, dev, k = self.config, self.device, self.config.context_length
        self._task_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._steps = np.zeros(n, dtype=np.int64)
        self._rtg = np.zeros(n, dtype=np.float64)  # current return-to-go, already divided by return_scale
        self._mean = torch.zeros(n, config.state_dim, device=dev)
        self._std = torch.ones(n, config.state_dim, device=dev)
        self._states = torch.zeros(n, k, config.state_dim, dtype=self.dtype, device=dev)
        self._actions = torch.zeros(n, k, config.act_dim, dtype=self.dtype, device=dev)
        self._returns = torch.zeros(n, k, 1, dtype=self.dtype, device=dev)
        self._timesteps = torch.zeros(n, k, dtype=torch.long, device=dev)
        self._mask = torch.zeros(n, k, dtype=torch.long, device=dev)
        self._prompt: dict[str, torch.Tensor] | None = None

    def _resolve_task_ids(self, tasks: Sequence[int | str]) -> list[int]:
        ids = []
        for task in tasks:
            if isinstance(task, str):
                ids.append(self.config.task_id(task))
            elif isinstance(task, (int, np.integer)) and 0 <= int(task) < self.config.num_tasks:
                ids.append(int(task))
            else:
                raise ValueError(
                    f"Task {task!r} is neither a task name nor a task id in [0, {self.config.num_tasks}) of this "
                    f"model's tasks {self.config.task_names}"
                )
        return ids

    def _slot_index(self, slots: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
        index = np.asarray(slots, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_slots):
            raise ValueError(f"{what} must be slot indices in [0, {self.num_slots}), got {index.tolist()}")
        if len(np.unique(index)) != index.size:
            raise ValueError(f"{what} has duplicate slots: {index.tolist()}")
        return index

    def reset(self, tasks: Sequence[int | str], slots: Sequence[int] | None = None) -> None:
        """Start episodes of ``tasks`` (names or ids).

        Without ``slots``: forget all episodes and start one per entry of ``tasks`` (slots ``0..n-1``). With
        ``slots``: restart only those slots (one task per slot); the other slots go on untouched.
        """
        ids = self._resolve_task_ids(list(tasks))
        if slots is None:
            self._allocate(len(ids))
            index = np.arange(len(ids))
        else:
            index = self._slot_index(slots, "slots")
            if index.size != len(ids):
                raise ValueError(f"reset got {len(ids)} tasks for {index.size} slots")
        if not index.size:
            return
        config = self.config
        ix = torch.as_tensor(index, device=self.device)
        task_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        self._task_ids[ix] = task_ids
        self._steps[index] = 0
        self._rtg[index] = np.asarray([config.target_returns[i] for i in ids], dtype=np.float64) / config.return_scale
        self._mean[ix] = torch.tensor([config.state_mean[i] for i in ids], dtype=torch.float32, device=self.device)
        self._std[ix] = torch.tensor([config.state_std[i] for i in ids], dtype=torch.float32, device=self.device)
        for buffer in (self._states, self._actions, self._returns, self._timesteps, self._mask):
            buffer[ix] = 0
        if config.use_prompt:
            prompts = self.model.task_prompts(task_ids)
            if self._prompt is None or slots is None:
                self._prompt = {key: value.clone() for key, value in prompts.items()}
            else:
                for key, value in prompts.items():
                    self._prompt[key][ix] = value

    @torch.inference_mode()
    def act(
        self,
        observations: np.ndarray,
        rewards: np.ndarray | Sequence[float] | None = None,
        active: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Actions ``(n, act_dim)`` for the running episodes in ``active`` (default: every slot).

        Args:
            observations: ``(n, state_dim)`` raw observations, one per active slot, in the order of ``active``.
            rewards: reward received after each active slot's previous action (decrements its return-to-go by
                ``reward / return_scale``); ignored for slots at their first step, required for the others.
            active: the slots to act for; ended episodes are simply left out and cost nothing.
        """
        config = self.config
        index = np.arange(self.num_slots) if active is None else self._slot_index(active, "active")
        obs = np.asarray(observations, dtype=np.float64)
        if obs.ndim == 1 and index.size == 1:
            obs = obs[None]
        if obs.ndim != 2 or obs.shape[1] != config.state_dim:
            raise ValueError(
                f"observations must be (n, state_dim={config.state_dim}) for this model, got shape {obs.shape}"
            )
        if obs.shape[0] != index.size:
            raise ValueError(f"got {obs.shape[0]} observations for {index.size} active episodes")
        if not index.size:
            return np.zeros((0, config.act_dim), dtype=np.float32)
        started = self._steps[index] > 0
        if started.any():
            if rewards is None:
                raise ValueError("rewards are required once an episode has taken a step (got rewards=None)")
            rew = np.asarray(rewards, dtype=np.float64).reshape(-1)
            if rew.size != index.size:
                raise ValueError(f"got {rew.size} rewards for {index.size} active episodes")
            self._rtg[index[started]] -= rew[started] / config.return_scale
        too_long = self._steps[index] >= config.max_ep_len
        if too_long.any():
            raise ValueError(
                f"episode in slot {int(index[too_long][0])} reached max_ep_len={config.max_ep_len} steps: the "
                "model has no timestep embedding beyond that"
            )

        ix = torch.as_tensor(index, device=self.device)
        buffers = (self._states, self._actions, self._returns, self._timesteps, self._mask)
        for buffer in buffers:
            buffer[ix] = buffer[ix].roll(-1, dims=1)
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        normalised = (obs_t - self._mean[ix]) / (self._std[ix] + STD_EPSILON)
        self._states[ix, -1] = normalised.to(self.dtype)
        self._actions[ix, -1] = 0
        self._returns[ix, -1, 0] = torch.as_tensor(self._rtg[index], dtype=self.dtype, device=self.device)
        self._timesteps[ix, -1] = torch.as_tensor(self._steps[index], device=self.device)
        self._mask[ix, -1] = 1

        prompt = {key: value[ix] for key, value in self._prompt.items()} if self._prompt is not None else None
        output = self.model(
            states=self._states[ix],
            actions=self._actions[ix],
            returns_to_go=self._returns[ix],
            timesteps=self._timesteps[ix],
            attention_mask=self._mask[ix],
            task_ids=self._task_ids[ix],
            prompt=prompt,
            return_dict=True,
        )
        action = output.action_preds[:, -1]
        self._actions[ix, -1] = action
        self._steps[index] += 1
        return action.float().cpu().numpy()


# ================================================================================================ episodes
@dataclass(frozen=True)
class EpisodeSpec:
    """One evaluation episode: ``episode`` of ``task`` uses goal ``goal_index`` and env reset seed ``reset_seed``."""

    index: int
    task: str
    task_id: int
    episode: int
    goal_index: int
    reset_seed: int
    video: bool = False

    def describe(self, seed: int) -> str:
        return (
            f"task {self.task!r} (episode {self.episode}, goal {self.goal_index}, evaluation seed {seed}, "
            f"env reset seed {self.reset_seed})"
        )


def episode_reset_seed(seed: int, task: str, episode: int) -> int:
    """The env reset seed of ``episode`` of ``task`` under evaluation ``seed`` (stable across task lists)."""
    sequence = np.random.SeedSequence([int(seed), MT50.index(task), int(episode)])
    return int(sequence.generate_state(1)[0])


def _default_env_factory(task: str, goal_index: int, seed: int):
    return make_env(task, goal_index, seed)


class _EpisodeError(Exception):
    """An environment of one episode failed; carries the episode index and the formatted traceback."""

    def __init__(self, index: int, details: str) -> None:
        super().__init__(details)
        self.index = index
        self.details = details


class _EnvSet:
    """Owns the environments of some episodes: creates, resets and steps them and records their videos."""

    def __init__(
        self,
        specs: Sequence[EpisodeSpec],
        env_factory: EnvFactory,
        seed: int,
        video_dir: str | None,
        video_format: str,
    ) -> None:
        self.specs = {spec.index: spec for spec in specs}
        self.env_factory = env_factory
        self.seed = seed
        self.video_dir = video_dir
        self.video_format = video_format
        self.envs: dict[int, Any] = {}
        self.frames: dict[int, list[np.ndarray]] = {}

    def _guard(self, index: int, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as error:  # reported to the parent with the episode's task and seed
            raise _EpisodeError(index, "".join(traceback.format_exception(error))) from error

    def reset(self) -> dict[int, np.ndarray]:
        observations = {}
        for index, spec in self.specs.items():
            env = self._guard(index, lambda spec=spec: self.env_factory(spec.task, spec.goal_index, self.seed))
            self.envs[index] = env
            if spec.video:
                self._guard(index, lambda env=env: _prepare_rendering(env))
            obs, _ = self._guard(index, lambda env=env, spec=spec: env.reset(seed=spec.reset_seed))
            observations[index] = np.asarray(obs, dtype=np.float64)
            if spec.video:
                self.frames[index] = [self._guard(index, env.render)]
        return observations

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, float, bool, bool]]:
        """``{index: (obs, reward, success, done)}`` after one step of each given episode."""
        results = {}
        for index, action in actions.items():
            env = self.envs[index]
            obs, reward, terminated, truncated, info = self._guard(index, lambda env=env, a=action: env.step(a))
            success = bool(info.get("success", 0.0))
            results[index] = (np.asarray(obs, dtype=np.float64), float(reward), success, bool(terminated or truncated))
            if index in self.frames:
                self.frames[index].append(self._guard(index, env.render))
        return results

    def finish(self, indices: Sequence[int], successes: dict[int, bool]) -> dict[int, str]:
        """Close the environments of ended episodes; write their videos. Returns ``{index: video path}``."""
        videos = {}
        for index in indices:
            frames = self.frames.pop(index, None)
            if frames:
                spec = self.specs[index]
                name = f"{spec.task}_episode{spec.episode:02d}_{'success' if successes.get(index) else 'failure'}"
                path = Path(self.video_dir or ".") / f"{name}.{self.video_format}"
                self._guard(index, lambda frames=frames, path=path: write_video(frames, path))
                videos[index] = str(path)
            env = self.envs.pop(index, None)
            if env is not None:
                self._guard(index, env.close)
        return videos

    def close(self) -> None:
        for env in self.envs.values():
            try:
                env.close()
            except Exception:  # best effort at shutdown
                pass
        self.envs.clear()


def _prepare_rendering(env) -> None:
    """Offscreen RGB rendering (EGL unless ``MUJOCO_GL`` says otherwise) without shadows or multisampling.

    Under software EGL (Mesa llvmpipe, what a machine without a GPU has) shadows dominate the cost: about 0.35 s per
    480x480 frame with them, 0.05 s without.
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    env.render_mode = "rgb_array"
    quality = env.unwrapped.model.vis.quality
    quality.shadowsize = 0
    quality.offsamples = 0


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 30) -> Path:
    """Write RGB frames to ``path``: ``.mp4`` (H.264 via imageio-ffmpeg) or ``.gif``."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
    else:
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=7, macro_block_size=1)
    return path


# ------------------------------------------------------------------------------------------------ env backends
class _LocalEnvs:
    """All environments in this process (``num_workers`` 0 or 1)."""

    def __init__(self, specs: Sequence[EpisodeSpec], seed: int, **env_kwargs) -> None:
        self.specs, self.seed = list(specs), seed
        self.envs = _EnvSet(specs, seed=seed, **env_kwargs)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except _EpisodeError as error:
            raise _episode_failure(self.specs[error.index], self.seed, error.details) from None

    def reset(self) -> dict[int, np.ndarray]:
        return self._call(self.envs.reset)

    def step(self, actions: dict[int, np.ndarray], finish: Sequence[int] = (), successes=None) -> dict:
        if finish:
            self.finish(finish, successes or {})
        return self._call(lambda: self.envs.step(actions))

    def finish(self, indices: Sequence[int], successes: dict[int, bool]) -> dict[int, str]:
        return self._call(lambda: self.envs.finish(indices, successes))

    def close(self) -> None:
        self.envs.close()


def _episode_failure(spec: EpisodeSpec, seed: int, details: str) -> RuntimeError:
    return RuntimeError(f"Environment failed for {spec.describe(seed)}:\n{details}")


def _worker_main(conn, specs: list[EpisodeSpec], seed: int, env_kwargs: dict) -> None:
    """Worker process: owns an ``_EnvSet`` and serves ``reset``/``step``/``finish``/``close`` requests."""
    envs = _EnvSet(specs, seed=seed, **env_kwargs)
    try:
        while True:
            command, *payload = conn.recv()
            try:
                if command == "reset":
                    reply = envs.reset()
                elif command == "step":
                    actions, finish, successes = payload
                    videos = envs.finish(finish, successes) if finish else {}
                    reply = (envs.step(actions), videos)
                elif command == "finish":
                    reply = envs.finish(*payload)
                elif command == "close":
                    break
                else:
                    raise ValueError(f"unknown command {command!r}")
            except _EpisodeError as error:
                conn.send(("error", error.index, error.details))
                continue
            conn.send(("ok", reply))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        envs.close()
        conn.close()


class _WorkerEnvs:
    """Environments spread over worker processes (each owns a subset), stepped in parallel.

    Every reply is awaited with a timeout while the worker's liveness is checked, so a crashed or stuck worker
    becomes a ``RuntimeError`` naming its episodes' tasks and seeds instead of a hang.
    """

    def __init__(
        self,
        specs: Sequence[EpisodeSpec],
        seed: int,
        num_workers: int,
        timeout: float,
        start_method: str,
        **env_kwargs,
    ) -> None:
        self.specs, self.seed, self.timeout = list(specs), seed, timeout
        context = mp.get_context(start_method)
        if start_method == "forkserver":
            context.set_forkserver_preload(["harmodt_hf.evaluation", "metaworld"])
        # Whole tasks go round-robin to workers (each worker builds MT1 only for its own tasks); with fewer tasks
        # than workers, episodes go round-robin instead.
        tasks = list(dict.fromkeys(spec.task for spec in self.specs))
        if len(tasks) >= num_workers:
            self.owned = [[s for s in self.specs if tasks.index(s.task) % num_workers == w] for w in range(num_workers)]
        else:
            self.owned = [self.specs[w::num_workers] for w in range(num_workers)]
        self.owner = {spec.index: w for w, owned in enumerate(self.owned) for spec in owned}
        self.conns, self.procs = [], []
        try:
            for w, owned in enumerate(self.owned):
                parent, child = context.Pipe()
                proc = context.Process(
                    target=_worker_main,
                    args=(child, owned, seed, env_kwargs),
                    name=f"harmodt-eval-env-{w}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def _receive(self, worker: int) -> Any:
        conn, proc = self.conns[worker], self.procs[worker]
        deadline = time.monotonic() + self.timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise self._worker_lost(worker, f"died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise self._worker_lost(worker, f"sent no reply within {self.timeout:.0f} s")
        try:
            status, *payload = conn.recv()
        except (EOFError, ConnectionError):
            proc.join(timeout=5)  # the pipe closes as the process exits: wait for its exit code
            raise self._worker_lost(worker, f"died (exit code {proc.exitcode})") from None
        if status == "error":
            index, details = payload
            spec = next(s for s in self.owned[worker] if s.index == index)
            raise _episode_failure(spec, self.seed, details)
        return payload[0]

    def _worker_lost(self, worker: int, what: str) -> RuntimeError:
        episodes = "; ".join(spec.describe(self.seed) for spec in self.owned[worker])
        pid = self.procs[worker].pid
        return RuntimeError(f"Environment worker {worker} (pid {pid}) {what}. Its episodes: {episodes}")

    def _request(self, messages: dict[int, tuple]) -> dict[int, Any]:
        for worker, message in messages.items():
            try:
                self.conns[worker].send(message)
            except (BrokenPipeError, ConnectionError):
                raise self._worker_lost(worker, "closed its pipe") from None
        return {worker: self._receive(worker) for worker in messages}

    def reset(self) -> dict[int, np.ndarray]:
        observations = {}
        for reply in self._request({w: ("reset",) for w in range(len(self.procs))}).values():
            observations.update(reply)
        return observations

    def step(self, actions: dict[int, np.ndarray], finish: Sequence[int] = (), successes=None) -> dict:
        successes = successes or {}
        per_worker: dict[int, tuple[dict, list, dict]] = {}
        for index, action in actions.items():
            per_worker.setdefault(self.owner[index], ({}, [], {}))[0][index] = action
        for index in finish:
            entry = per_worker.setdefault(self.owner[index], ({}, [], {}))
            entry[1].append(index)
            entry[2][index] = successes.get(index, False)
        replies = self._request({w: ("step", *entry) for w, entry in per_worker.items()})
        results = {}
        for step_results, _videos in replies.values():
            results.update(step_results)
        return results

    def finish(self, indices: Sequence[int], successes: dict[int, bool]) -> dict[int, str]:
        per_worker: dict[int, list[int]] = {}
        for index in indices:
            per_worker.setdefault(self.owner[index], []).append(index)
        videos = {}
        for reply in self._request({w: ("finish", idx, successes) for w, idx in per_worker.items()}).values():
            videos.update(reply)
        return videos

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if proc.is_alive():
                try:
                    conn.send(("close",))
                except (BrokenPipeError, ConnectionError, OSError):
                    pass
        for conn, proc in zip(self.conns, self.procs, strict=True):
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            conn.close()
        self.conns, self.procs = [], []


# ================================================================================================ evaluate
def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return int(value)


def _video_flags(video_episodes: int | Sequence[int], episodes_per_task: int) -> set[int]:
    if isinstance(video_episodes, (int, np.integer)):
        return set(range(min(int(video_episodes), episodes_per_task)))
    chosen = {int(e) for e in video_episodes}
    if any(not 0 <= e < episodes_per_task for e in chosen):
        raise ValueError(f"video_episodes must be episode numbers in [0, {episodes_per_task}), got {sorted(chosen)}")
    return chosen


@dataclass
class _Rollout:
    """Per-episode outcomes of :func:`_rollout`, indexed by ``EpisodeSpec.index``."""

    returns: np.ndarray
    lengths: np.ndarray
    successes: np.ndarray
    actions: list[list[list[float]]]
    videos: dict[int, str]


def _rollout(
    policy: HarmoDTPolicy,
    envs: _LocalEnvs | _WorkerEnvs,
    num_episodes: int,
    max_steps: int,
    stop_on_success: bool,
    record_actions: bool,
    progress: bool,
) -> _Rollout:
    """Run every episode to its end: one policy call for all running episodes, then one parallel env step."""
    out = _Rollout(
        returns=np.zeros(num_episodes),
        lengths=np.zeros(num_episodes, dtype=np.int64),
        successes=np.zeros(num_episodes, dtype=bool),
        actions=[[] for _ in range(num_episodes)],
        videos={},
    )
    observations = envs.reset()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc="evaluate", unit="step")
    try:
        active = list(range(num_episodes))
        rewards = np.zeros(num_episodes)
        ended: list[int] = []
        for step in range(max_steps):
            obs = np.stack([observations[i] for i in active])
            actions = policy.act(obs, rewards[active] if step else None, active=active)
            results = envs.step(
                {i: actions[j] for j, i in enumerate(active)},
                finish=ended,
                successes={i: bool(out.successes[i]) for i in ended},
            )
            ended = []
            for j, i in enumerate(active):
                observations[i], rewards[i], success, done = results[i]
                out.returns[i] += rewards[i]
                out.lengths[i] += 1
                out.successes[i] |= success
                if record_actions:
                    out.actions[i].append([float(a) for a in actions[j]])
                if done or (success and stop_on_success):
                    ended.append(i)
            ended_set = set(ended)
            active = [i for i in active if i not in ended_set]
            if bar is not None:
                bar.set_postfix(running=len(active), successes=int(out.successes.sum()), refresh=False)
                bar.update(1)
            if not active:
                break
        finished = ended + active
        out.videos.update(envs.finish(finished, {i: bool(out.successes[i]) for i in finished}))
    finally:
        if bar is not None:
            bar.close()
    return out


def evaluate(
    model: torch.nn.Module,
    tasks: str | Sequence[str] = "mt50",
    episodes_per_task: int = 10,
    seed: int = 0,
    stop_on_success: bool = True,
    num_workers: int | None = None,
    max_steps: int = EPISODE_LENGTH,
    video_episodes: int | Sequence[int] = 0,
    video_dir: str | Path | None = None,
    video_format: str = "mp4",
    record_actions: bool = False,
    progress: bool = False,
    env_factory: EnvFactory | None = None,
    worker_timeout: float = 300.0,
    start_method: str = "forkserver",
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Roll out ``episodes_per_task`` episodes of every task with the model; return a JSON-serialisable dict.

    Episode ``e`` of a task uses goal ``e`` of ``MT1(task, seed=seed)`` and env reset seed
    ``episode_reset_seed(seed, task, e)``. All running episodes are advanced together (one policy call per step).

    Args:
        model: a :class:`~harmodt_hf.HarmoDTModel`; put in eval mode for the rollouts and restored afterwards.
        tasks: a task set (``mt5``/``mt10``/``mt30``/``mt50``), a comma-separated string or a list of task names;
            every task must be one of the model's ``config.task_names``.
        episodes_per_task: 1..50 (one goal per episode).
        seed: evaluation seed (goal list and env reset seeds).
        stop_on_success: end an episode at its first success (the success rate is unchanged; returns and lengths
            then count the steps up to the first success).
        num_workers: env worker processes; ``None`` uses one per CPU core (at most one per episode); 0 or 1 steps
            the envs in this process.
        max_steps: episode length limit (500 in the official protocol).
        video_episodes: episodes to render per task: a count (the first ``n``) or a list of episode numbers.
        video_dir: where videos go (``<task>_episode<e>_<success|failure>.<video_format>``); required for videos.
        video_format: ``"mp4"`` or ``"gif"``.
        record_actions: also return every episode's actions (``per_task[task]["actions"]``).
        progress: show a tqdm bar over environment steps.
        env_factory: ``(task, goal_index, seed) -> env`` replacing :func:`harmodt_hf.tasks.make_env` (must be
            picklable when workers are used).
        worker_timeout: seconds to wait for a worker's reply before reporting it as stuck.
        start_method: multiprocessing start method of the workers.
        torch_threads: torch CPU threads during the rollouts (restored afterwards); ``None`` leaves them as they are.
            With 1 thread the actions of an episode are bit-identical whatever else is in the batch; with more, the
            CPU matmul kernels can change the last bits (~3e-7 measured at batch 30) and the simulator can amplify
            that over an episode. 1 is also much faster on a machine whose cores are already busy.
    """
    config = model.config
    task_names = resolve_tasks(tasks)
    task_ids = [config.task_id(name) for name in task_names]
    episodes_per_task = _check_int("episodes_per_task", episodes_per_task, 1, GOALS_PER_TASK)
    seed = _check_int("seed", seed, 0)
    max_steps = _check_int("max_steps", max_steps, 1, min(EPISODE_LENGTH, config.max_ep_len))
    if (config.state_dim, config.act_dim) != (OBSERVATION_DIM, ACTION_DIM):
        raise ValueError(
            f"Meta-World has {OBSERVATION_DIM}-dim observations and {ACTION_DIM}-dim actions; this model has "
            f"state_dim={config.state_dim}, act_dim={config.act_dim}"
        )
    if video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format must be 'mp4' or 'gif', got {video_format!r}")
    if torch_threads is not None:
        _check_int("torch_threads", torch_threads, 1)
    with_video = _video_flags(video_episodes, episodes_per_task)
    if with_video and video_dir is None:
        raise ValueError("video_episodes needs video_dir")

    specs = [
        EpisodeSpec(
            index=t * episodes_per_task + e,
            task=name,
            task_id=task_id,
            episode=e,
            goal_index=e,
            reset_seed=episode_reset_seed(seed, name, e),
            video=e in with_video,
        )
        for t, (name, task_id) in enumerate(zip(task_names, task_ids, strict=True))
        for e in range(episodes_per_task)
    ]
    num_episodes = len(specs)
    workers = (os.cpu_count() or 1) if num_workers is None else _check_int("num_workers", num_workers, 0)
    workers = min(workers, num_episodes)
    env_kwargs = dict(
        env_factory=env_factory or _default_env_factory,
        video_dir=str(video_dir) if video_dir is not None else None,
        video_format=video_format,
    )

    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if hasattr(model, "cache_masked_weights"):
        model.cache_masked_weights(True)  # W ⊙ M[t] built once per task for the whole evaluation
    envs = None
    try:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        policy = HarmoDTPolicy(model)
        policy.reset([spec.task_id for spec in specs])  # fails early (e.g. no stored prompt) before any env starts
        start = time.perf_counter()
        if workers <= 1:
            envs = _LocalEnvs(specs, seed, **env_kwargs)
        else:
            envs = _WorkerEnvs(specs, seed, workers, worker_timeout, start_method, **env_kwargs)
        out = _rollout(policy, envs, num_episodes, max_steps, stop_on_success, record_actions, progress)
    finally:
        if envs is not None:
            envs.close()
        if hasattr(model, "cache_masked_weights"):
            model.cache_masked_weights(False)
        model.train(was_training)
        torch.set_num_threads(threads)
    wall_time = time.perf_counter() - start
    returns, lengths, successes, videos = out.returns, out.lengths, out.successes, out.videos

    per_task = {}
    for t, name in enumerate(task_names):
        rows = range(t * episodes_per_task, (t + 1) * episodes_per_task)
        entry = {
            "success_rate": float(successes[rows].mean()),
            "mean_return": float(returns[rows].mean()),
            "mean_episode_length": float(lengths[rows].mean()),
            "episodes": episodes_per_task,
            "successes": [bool(successes[i]) for i in rows],
            "returns": [float(returns[i]) for i in rows],
            "episode_lengths": [int(lengths[i]) for i in rows],
            "goal_indices": [specs[i].goal_index for i in rows],
            "reset_seeds": [specs[i].reset_seed for i in rows],
            "target_return": float(config.target_returns[task_ids[t]]),
        }
        if record_actions:
            entry["actions"] = [out.actions[i] for i in rows]
        task_videos = {str(specs[i].episode): videos[i] for i in rows if i in videos}
        if task_videos:
            entry["videos"] = task_videos
        per_task[name] = entry
    return {
        "mean_success_rate": float(np.mean([entry["success_rate"] for entry in per_task.values()])),
        "per_task": per_task,
        "tasks": task_names,
        "seed": seed,
        "episodes_per_task": episodes_per_task,
        "max_steps": max_steps,
        "stop_on_success": bool(stop_on_success),
        "target_returns": {name: float(config.target_returns[i]) for name, i in zip(task_names, task_ids, strict=True)},
        "return_scale": float(config.return_scale),
        "model": {
            "name_or_path": getattr(config, "_name_or_path", "") or None,
            "commit_hash": getattr(config, "_commit_hash", None),
            "mask_mode": config.mask_mode,
            "use_prompt": bool(config.use_prompt),
        },
        "env_steps": int(lengths.sum()),
        "wall_time_s": wall_time,
        "num_workers": workers if workers > 1 else 0,
        "torch_threads": torch_threads or threads,
    }


# ================================================================================================ plots
def plot_success(results: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Bar chart of per-task success rate (%) with the mean as a dashed line, saved as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["per_task"])
    rates = [100.0 * results["per_task"][name]["success_rate"] for name in names]
    mean = 100.0 * results["mean_success_rate"]
    fig = Figure(figsize=(8, max(2.5, 0.28 * len(names) + 1.2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.barh(positions, rates, color="tab:blue")
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f} %")
    ax.set_yticks(positions, [name.removesuffix("-v3") for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success rate (%)")
    ax.set_ylabel("task")
    episodes = results.get("episodes_per_task")
    ax.set_title(title or f"Success per task ({episodes} episodes each, seed {results.get('seed')})")
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


__all__ = [
    "EpisodeSpec",
    "HarmoDTPolicy",
    "episode_reset_seed",
    "evaluate",
    "plot_success",
    "write_video",
]
