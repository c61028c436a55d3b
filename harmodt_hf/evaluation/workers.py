"""Evaluation environments: episode specs and reset seeds, in-process and worker-process env sets, videos.

:func:`harmodt_hf.evaluation.evaluate` describes every episode by an :class:`EpisodeSpec` and steps the environments
either in this process (:class:`LocalEnvs`) or in worker processes (:class:`WorkerEnvs`, each serving a
:class:`LocalEnvs` from :func:`_worker_main`). A failing or lost environment becomes a ``RuntimeError`` naming the
episode's task and seeds.
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

from harmodt_hf.tasks import MT50

EnvFactory = Callable[[str, int, int], Any]  # (task name, goal index, benchmark seed) -> gymnasium env


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


def default_env_factory(task: str, goal_index: int, seed: int):
    from harmodt_hf.envs import make_env  # MuJoCo is imported where environments are built

    return make_env(task, goal_index, seed)


class LocalEnvs:
    """Owns the environments of some episodes: creates, resets and steps them and records their videos. All the
    environments of an evaluation with ``num_workers`` 0 or 1; a subset in each worker process otherwise."""

    def __init__(
        self,
        specs: Sequence[EpisodeSpec],
        seed: int,
        env_factory: EnvFactory,
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
        except Exception as error:
            details = "".join(traceback.format_exception(error))
            raise RuntimeError(f"Environment failed for {self.specs[index].describe(self.seed)}:\n{details}") from error

    def waves(self, count: int) -> list[list[int]]:
        """Envs in one process step one after another: there is nothing to overlap, so one wave of every episode."""
        return [list(self.specs)]

    def send_step(self, actions: dict[int, np.ndarray], finish: Sequence[int], successes: dict[int, bool]) -> tuple:
        """Close ``finish`` and step now; :meth:`receive_step` hands the results back (as :class:`WorkerEnvs`)."""
        videos = self.finish(finish, successes)
        return self.step(actions), videos

    def receive_step(self, ticket: tuple) -> tuple[dict, dict[int, str]]:
        return ticket

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
    """Offscreen RGB rendering (EGL unless ``MUJOCO_GL`` says otherwise) without shadows or multisampling (shadows
    cost ~7x per frame under software EGL)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    env.unwrapped.render_mode = "rgb_array"
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
        check_mp4_support()
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=7, macro_block_size=1)
    return path


def check_mp4_support() -> None:
    """Raise ``RuntimeError`` naming the extra to install when MP4 encoding (imageio-ffmpeg) is missing."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "MP4 videos need imageio-ffmpeg: pip install 'harmodt-hf[video]' (or write GIFs: video_format='gif')"
        ) from error


# ------------------------------------------------------------------------------------------------ env backends
def _worker_main(conn, specs: list[EpisodeSpec], seed: int, env_kwargs: dict) -> None:
    """Worker process: owns a :class:`LocalEnvs` and serves ``reset``/``step``/``close`` requests."""
    envs = LocalEnvs(specs, seed=seed, **env_kwargs)
    try:
        while True:
            command, *payload = conn.recv()
            try:
                if command == "reset":
                    reply = envs.reset()
                elif command == "step":
                    reply = envs.send_step(*payload)
                elif command == "close":
                    break
                else:
                    raise ValueError(f"unknown command {command!r}")
            except RuntimeError as error:  # an environment failed: the message names its episode
                conn.send(("error", str(error)))
                continue
            conn.send(("ok", reply))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        envs.close()
        conn.close()


class WorkerEnvs:
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
        **env_kwargs,
    ) -> None:
        self.specs, self.seed, self.timeout = list(specs), seed, timeout
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["harmodt_hf.evaluation.workers", "metaworld"])
        # Whole tasks go round-robin to workers (each builds the goals and MuJoCo models of its own tasks only); with
        # fewer tasks than workers, episodes go round-robin (so the long episodes of a hard task are spread out).
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
            raise RuntimeError(payload[0])
        return payload[0]

    def _worker_lost(self, worker: int, what: str) -> RuntimeError:
        episodes = "; ".join(spec.describe(self.seed) for spec in self.owned[worker])
        pid = self.procs[worker].pid
        return RuntimeError(f"Environment worker {worker} (pid {pid}) {what}. Its episodes: {episodes}")

    def _send(self, messages: dict[int, tuple]) -> list[int]:
        for worker, message in messages.items():
            try:
                self.conns[worker].send(message)
            except (BrokenPipeError, ConnectionError):
                raise self._worker_lost(worker, "closed its pipe") from None
        return list(messages)

    def waves(self, count: int) -> list[list[int]]:
        """The episodes split into at most ``count`` waves, each owned by its own workers (worker ``w`` goes to wave
        ``w % count``): one wave's environments can step while the policy acts for another."""
        waves = [
            [spec.index for w, owned in enumerate(self.owned) if w % count == k for spec in owned] for k in range(count)
        ]
        return [wave for wave in waves if wave]

    def reset(self) -> dict[int, np.ndarray]:
        observations = {}
        for worker in self._send({w: ("reset",) for w in range(len(self.procs))}):
            observations.update(self._receive(worker))
        return observations

    def send_step(self, actions: dict[int, np.ndarray], finish: Sequence[int], successes: dict[int, bool]) -> list:
        """Send one step of the given episodes to their workers (and close ``finish``); returns the ticket for
        :meth:`receive_step`. Until then the workers step while this process goes on."""
        per_worker: dict[int, tuple[dict, list, dict]] = {}
        for index, action in actions.items():
            per_worker.setdefault(self.owner[index], ({}, [], {}))[0][index] = action
        for index in finish:
            entry = per_worker.setdefault(self.owner[index], ({}, [], {}))
            entry[1].append(index)
            entry[2][index] = successes.get(index, False)
        return self._send({w: ("step", *entry) for w, entry in per_worker.items()})

    def receive_step(self, ticket: list[int]) -> tuple[dict, dict[int, str]]:
        """``{index: (obs, reward, success, done)}`` of the step sent with ``ticket``, and the videos of the episodes
        it closed."""
        results, videos = {}, {}
        for worker in ticket:
            step_results, closed = self._receive(worker)
            results.update(step_results)
            videos.update(closed)
        return results, videos

    def finish(self, indices: Sequence[int], successes: dict[int, bool]) -> dict[int, str]:
        """Close the environments of ended episodes; returns ``{index: video path}``."""
        return self.receive_step(self.send_step({}, indices, successes))[1]

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


__all__ = [
    "EnvFactory",
    "EpisodeSpec",
    "LocalEnvs",
    "check_mp4_support",
    "WorkerEnvs",
    "default_env_factory",
    "episode_reset_seed",
    "write_video",
]
