"""Model cards: the Hub card (YAML metadata with one eval result per task + Markdown body), mask figures, and the
Hub-ready model folder (weights, card, figures, results JSON).

The card's ``library_name`` is ``transformers``: ``save_pretrained`` writes the modelling code and an ``auto_map`` into
the folder, so ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` loads the model without harmodt-hf, and the
card's first usage snippet (tested as printed) does just that.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from harmodt_hf.model.masks import mask_density, mask_overlap_counts, pairwise_iou
from harmodt_hf.tasks import task_set_name

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md.j2"
LIBRARY_NAME = "transformers"
TAGS = ["reinforcement-learning", "meta-world", "harmodt", "decision-transformer", "multi-task", "offline-rl"]
FIGURE_KEYS = ("success", "mask_overlap", "mask_embedding", "video")
FIGURE_FILES = {
    "success": "images/success_per_task.png",
    "mask_overlap": "images/mask_overlap.png",
    "mask_embedding": "images/mask_embedding.png",
}
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm")
VARIANT_LABELS = {
    "harmodt-f": ("HarmoDT-F", "Masks are learned by the harmony loop with Fisher (squared-gradient) importance."),
    "harmodt-m": ("HarmoDT-M", "Masks are learned by the harmony loop with weight-magnitude importance."),
    "harmodt-r": ("HarmoDT-R", "Masks are random ERK masks, fixed during training (the paper's ablation)."),
    "harmodt": ("HarmoDT", "Masks are learned by the harmony loop."),
    "prompt-dt": ("Prompt-DT", "Baseline without masks: all tasks share every weight; a task prompt tells them apart."),
    "mtdt": ("MTDT", "Baseline without masks or prompts: one shared Decision Transformer for all tasks."),
}
TASK_SAMPLING_NOTES = {
    "round_robin": "round_robin (one task per optimizer step, as the official code)",
    "all_tasks": "all_tasks (every optimizer step's batch covers all tasks)",
}


class CardError(ValueError):
    """The inputs of a model card do not describe the model (missing tasks, bad values, bad figure paths)."""


# ------------------------------------------------------------------------------------------------ checks
def check_eval_results(model: torch.nn.Module, eval_results: Mapping[str, Any]) -> list[str]:
    """Check that ``eval_results`` (as returned by ``evaluation.evaluate``) covers exactly the model's tasks.

    Returns the evaluated task names in the results' order. Raises :class:`CardError` naming what is wrong.
    """
    if not isinstance(eval_results, Mapping):
        raise CardError(f"eval_results must be the dict returned by evaluate(), got {type(eval_results).__name__}")
    per_task = eval_results.get("per_task")
    if not isinstance(per_task, Mapping) or not per_task:
        raise CardError(
            "eval_results has no 'per_task' entries: pass the dict returned by harmodt_hf.evaluation.rollouts.evaluate"
        )
    model_tasks = list(model.config.task_names)
    missing = [t for t in model_tasks if t not in per_task]
    if missing:
        raise CardError(
            f"eval_results lacks {len(missing)} of the model's {len(model_tasks)} tasks: {missing}. A model card "
            "reports every task: evaluate with tasks=model.config.task_names."
        )
    extra = [t for t in per_task if t not in model_tasks]
    if extra:
        raise CardError(f"eval_results has tasks the model was not trained on: {extra} (model tasks: {model_tasks})")
    for task, entry in per_task.items():
        for key in ("success_rate", "mean_return", "mean_episode_length", "episodes"):
            if not isinstance(entry, Mapping) or key not in entry:
                raise CardError(f"eval_results['per_task'][{task!r}] lacks {key!r}")
        rate = entry["success_rate"]
        if not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise CardError(f"eval_results['per_task'][{task!r}]['success_rate'] must be in [0, 1], got {rate!r}")
    for key in ("mean_success_rate", "seed", "episodes_per_task", "max_steps"):
        if key not in eval_results:
            raise CardError(f"eval_results lacks {key!r}")
    mean = float(np.mean([float(entry["success_rate"]) for entry in per_task.values()]))
    if not math.isclose(float(eval_results["mean_success_rate"]), mean, abs_tol=1e-9):
        raise CardError(
            f"eval_results['mean_success_rate'] = {eval_results['mean_success_rate']!r} is not the mean of the "
            f"per-task success rates ({mean!r})"
        )
    return list(per_task)


def _check_figures(figures: Mapping[str, str] | None) -> dict[str, str]:
    figures = dict(figures or {})
    unknown = sorted(set(figures) - set(FIGURE_KEYS))
    if unknown:
        raise CardError(f"Unknown figure key(s) {unknown}; known: {list(FIGURE_KEYS)}")
    for key, path in figures.items():
        posix = PurePosixPath(str(path))
        if not str(path) or posix.is_absolute() or ".." in posix.parts or "\\" in str(path):
            raise CardError(f"figures[{key!r}] = {path!r} must be a relative path inside the model folder")
    return {key: str(path) for key, path in figures.items()}


# ------------------------------------------------------------------------------------------------ mask statistics
def _require_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    masks = model.get_task_masks()
    if not masks:
        raise ValueError(
            f"This model has no task masks (mask_mode={model.config.mask_mode!r}): there is nothing to plot"
        )
    return masks


def mask_embedding(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA of the task masks: ``(coords (T, 2), explained variance ratio (2,))``.

    Each task is the 0/1 vector of all its masked weights. The PCA is computed exactly from the T × T Gram matrix of
    the centred vectors (an eigendecomposition), so the T × N matrix is never built in floating point — a paper-size
    MT50 model has millions of masked weights per task. Each component's sign is fixed so that its largest
    coordinate (in absolute value) is positive.
    """
    gram = mask_overlap_counts(_require_masks(model)).cpu()
    num_tasks = gram.shape[0]
    centre = torch.eye(num_tasks, dtype=torch.float64) - 1.0 / num_tasks
    centred = centre @ gram @ centre
    eigvals, eigvecs = torch.linalg.eigh((centred + centred.T) / 2)
    order = torch.argsort(eigvals, descending=True)
    eigvals, eigvecs = eigvals[order].clamp_min(0.0), eigvecs[:, order]
    eigvals[eigvals < 1e-9 * eigvals.max().clamp_min(1e-300)] = 0.0  # rounding noise of an exactly zero variance
    coords = torch.zeros(num_tasks, 2, dtype=torch.float64)
    ratio = torch.zeros(2, dtype=torch.float64)
    total = eigvals.sum()
    for k in range(min(2, num_tasks)):
        column = eigvecs[:, k] * eigvals[k].sqrt()
        if column[column.abs().argmax()] < 0:
            column = -column
        coords[:, k] = column
        ratio[k] = eigvals[k] / total if total > 0 else 0.0
    return coords.numpy(), ratio.numpy()


def _short(task: str) -> str:
    return task.removesuffix("-v3")


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def mask_overlap_figure(model: torch.nn.Module):
    """Heatmap (matplotlib ``Figure``) of the pairwise IoU between the task masks."""
    iou = pairwise_iou(_require_masks(model)).cpu().numpy()
    names = [_short(t) for t in model.config.task_names]
    size = min(14.0, max(4.5, 0.3 * len(names) + 3.0))
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    off_diagonal = iou[~np.eye(len(names), dtype=bool)]
    # The colour range spans the off-diagonal values (the diagonal, always 1, is drawn at the top colour).
    low = float(off_diagonal.min()) if off_diagonal.size else 0.0
    high = float(off_diagonal.max()) if off_diagonal.size else 1.0
    high = high if high > low else low + 1e-3
    image = ax.imshow(iou, cmap="viridis", vmin=low, vmax=high)
    ticks = np.arange(len(names))
    font = 8 if len(names) <= 20 else 5
    ax.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(ticks, names, fontsize=font)
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    ax.set_title("Pairwise task-mask overlap (IoU of kept weights)")
    if len(names) <= 12:
        middle = (low + high) / 2
        for i in range(len(names)):
            for j in range(len(names)):
                color = "black" if iou[i, j] > middle else "white"
                ax.text(j, i, f"{iou[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="IoU (diagonal = 1)")
    return fig


def mask_embedding_figure(model: torch.nn.Module):
    """Scatter plot (matplotlib ``Figure``) of the 2-D PCA embedding of the task masks, one labelled point per task."""
    coords, ratio = mask_embedding(model)
    names = [_short(t) for t in model.config.task_names]
    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(names))]
    ax.scatter(coords[:, 0], coords[:, 1], c=colors, s=50, edgecolors="black", linewidths=0.5, zorder=3)
    for (x, y), name in zip(coords, names, strict=True):
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f} % of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f} % of variance)")
    ax.set_title("Task masks, 2-D PCA (one point per task)")
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_mask_overlap(model: torch.nn.Module, path: str | Path) -> Path:
    """Save the pairwise task-mask IoU heatmap as a PNG at ``path``; ``ValueError`` for a model without masks."""
    return _save(mask_overlap_figure(model), path)


def plot_mask_embedding(model: torch.nn.Module, path: str | Path) -> Path:
    """Save the 2-D PCA embedding of the task masks as a PNG at ``path``; ``ValueError`` without masks."""
    return _save(mask_embedding_figure(model), path)


# ------------------------------------------------------------------------------------------------ card
def _variant(model: torch.nn.Module, training_summary: Mapping[str, Any] | None) -> str:
    config = model.config
    variant = getattr(config, "variant", None) or (training_summary or {}).get("variant")
    if variant in VARIANT_LABELS:
        return variant
    if config.mask_mode == "harmony":
        return "harmodt"
    if config.mask_mode == "random":
        return "harmodt-r"
    return "prompt-dt" if config.use_prompt else "mtdt"


def _eval_metadata(tasks: list[str], eval_results: Mapping[str, Any]) -> list[EvalResult]:
    """One model-index result per task (success rate in %) plus the mean over tasks."""
    set_name = task_set_name(tasks)
    mean_name = f"Meta-World {set_name.upper()}" if set_name else f"Meta-World ({len(tasks)} tasks)"
    rows = [(mean_name, set_name or "all-evaluated-tasks", "mean_success_rate", eval_results["mean_success_rate"])]
    rows += [(f"Meta-World {t}", t, "success_rate", eval_results["per_task"][t]["success_rate"]) for t in tasks]
    return [
        EvalResult(
            task_type="reinforcement-learning",
            task_name="Multi-task offline reinforcement learning",
            dataset_type="metaworld",
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            metric_type=metric,
            metric_name=metric.replace("_", " ") + " (%)",
            metric_value=round(100.0 * float(rate), 2),
        )
        for dataset_name, dataset_config, metric, rate in rows
    ]


def _success_count(entry: Mapping[str, Any]) -> int:
    if isinstance(entry.get("successes"), (list, tuple)):
        return int(sum(bool(s) for s in entry["successes"]))
    return int(round(float(entry["success_rate"]) * int(entry["episodes"])))


def _format_counts(counts: Any) -> str:
    if isinstance(counts, (list, tuple)) and counts:
        low, high = min(counts), max(counts)
        return str(low) if low == high else f"{low}–{high}"
    return str(counts)


def _training_rows(model: torch.nn.Module, variant: str, summary: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    config = model.config
    rows: list[tuple[str, str]] = [("variant", f"`{variant}`"), ("mask mode", f"`{config.mask_mode}`")]
    if config.has_masks:
        rows.append(("sparsity (per task)", f"{config.sparsity}"))
    if not summary:
        return rows
    dataset = summary.get("dataset")
    if dataset:
        config_name = summary.get("dataset_config")
        rows.append(("data", f"`{dataset}`" + (f", config `{config_name}`" if config_name else "")))
    if "episodes_per_task" in summary:
        rows.append(("episodes per task", _format_counts(summary["episodes_per_task"])))
    for key, label in (("max_steps", "optimizer steps"), ("seed", "seed")):
        if key in summary:
            rows.append((label, str(summary[key])))
    if "task_sampling" in summary:
        rows.append(("task sampling", TASK_SAMPLING_NOTES.get(summary["task_sampling"], str(summary["task_sampling"]))))
    if config.mask_mode == "harmony":
        if "update_rule" in summary:
            rows.append(("mask update rule", f"`{summary['update_rule']}`"))
        if "mask_update_interval" in summary:
            rows.append(("mask update every", f"{summary['mask_update_interval']} steps"))
    loss = summary.get("final_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        rows.append(("final training loss (action MSE)", f"{loss:.4f}"))
    return rows


def build_model_card(
    model: torch.nn.Module,
    eval_results: Mapping[str, Any],
    *,
    training_summary: Mapping[str, Any] | None = None,
    dataset_repo: str | None = None,
    figures: Mapping[str, str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card: metadata (tags, datasets, model-index with one success-rate result per task plus the mean)
    and a body with the results table, mask statistics, training settings, usage and citation.

    ``figures`` maps ``success`` / ``mask_overlap`` / ``mask_embedding`` / ``video`` to paths relative to the model
    folder (the card links them; :func:`write_model_folder` creates them). ``dataset_repo`` (a Hub dataset id) goes
    into the ``datasets`` metadata; ``repo_id`` names the model in the usage snippets and the model index.
    """
    import jinja2

    tasks = check_eval_results(model, eval_results)
    figures = _check_figures(figures)
    config = model.config
    variant = _variant(model, training_summary)
    label, note = VARIANT_LABELS[variant]
    set_name = task_set_name(tasks)
    model_name = repo_id.split("/")[-1] if repo_id else f"{variant}-{set_name or f'{len(tasks)}-tasks'}"

    densities: dict[str, float] = {}
    mean_iou = mean_density = float("nan")
    if config.has_masks:
        masks = model.get_task_masks()
        density = mask_density(masks).tolist()
        densities = dict(zip(config.task_names, density, strict=True))
        mean_density = float(np.mean(density))
        iou = pairwise_iou(masks).cpu().numpy()
        off = iou[~np.eye(len(iou), dtype=bool)]
        mean_iou = float(off.mean()) if off.size else 1.0

    per_task = eval_results["per_task"]
    rows = [
        dict(
            task=task,
            success_rate=float(per_task[task]["success_rate"]),
            successes=_success_count(per_task[task]),
            episodes=int(per_task[task]["episodes"]),
            mean_return=float(per_task[task]["mean_return"]),
            mean_episode_length=float(per_task[task]["mean_episode_length"]),
            target_return=float(per_task[task].get("target_return", config.target_returns[config.task_id(task)])),
            density=densities.get(task, float("nan")),
        )
        for task in tasks
    ]
    video_task = None
    if "video" in figures:
        video_task = next((t for t in tasks if Path(figures["video"]).name.startswith(t)), "one of the tasks")

    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license="apache-2.0",
        tags=list(TAGS) + [variant],
        datasets=[dataset_repo] if dataset_repo else None,
        pipeline_tag="reinforcement-learning",
        model_name=model_name,
        eval_results=_eval_metadata(tasks, eval_results),
    )
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    template = env.from_string(TEMPLATE_PATH.read_text(encoding="utf-8"))
    content = template.render(
        card_data=card_data.to_yaml(),
        title=f"{label} on Meta-World {set_name.upper() if set_name else f'({len(tasks)} tasks)'}",
        variant_label=label,
        variant_note=note,
        config=config,
        num_tasks=len(tasks),
        task_list=", ".join(f"`{t}`" for t in tasks),
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_masked=model.num_masked_parameters() if hasattr(model, "num_masked_parameters") else 0,
        has_masks=config.has_masks,
        results=eval_results,
        rows=rows,
        figures={key: figures.get(key) for key in FIGURE_KEYS},
        video_task=video_task,
        mean_density=mean_density,
        mean_iou=mean_iou,
        training_rows=_training_rows(model, variant, training_summary),
        has_training=bool(training_summary),
        model_ref=repo_id or "path/to/this/model",
        first_task=tasks[0],
        tasks_arg=set_name or ",".join(tasks),
    )
    return ModelCard(content)


# ------------------------------------------------------------------------------------------------ model folder
def _check_video(video: str | Path | None) -> Path | None:
    if video is None:
        return None
    video = Path(video)
    if not video.is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    if video.suffix.lower() not in VIDEO_SUFFIXES:
        raise CardError(f"video must be one of {VIDEO_SUFFIXES}, got {video.name}")
    return video


def _load_summary(training_summary: Mapping[str, Any] | str | Path | None) -> dict[str, Any] | None:
    if training_summary is None or isinstance(training_summary, Mapping):
        return dict(training_summary) if training_summary is not None else None
    path = Path(training_summary)
    if not path.is_file():
        raise FileNotFoundError(f"training summary {path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def write_card_files(
    model: torch.nn.Module,
    folder: str | Path,
    eval_results: Mapping[str, Any],
    training_summary: Mapping[str, Any] | str | Path | None = None,
    video: str | Path | None = None,
    *,
    dataset_repo: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write everything but the weights into ``folder``: figures, ``results.json``, ``training_summary.json`` (when
    given), the video (copied to ``videos/``) and ``README.md``. Returns the README path."""
    check_eval_results(model, eval_results)
    summary = _load_summary(training_summary)
    video = _check_video(video)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from harmodt_hf.evaluation.rollouts import plot_success

    figures = {"success": FIGURE_FILES["success"]}
    plot_success(eval_results, folder / FIGURE_FILES["success"])
    if model.config.has_masks:
        plot_mask_overlap(model, folder / FIGURE_FILES["mask_overlap"])
        plot_mask_embedding(model, folder / FIGURE_FILES["mask_embedding"])
        figures.update(mask_overlap=FIGURE_FILES["mask_overlap"], mask_embedding=FIGURE_FILES["mask_embedding"])
    if video is not None:
        relative = f"videos/{video.name}"
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if video.resolve() != target.resolve():
            shutil.copy2(video, target)
        figures["video"] = relative
    (folder / "results.json").write_text(json.dumps(eval_results, indent=2), encoding="utf-8")
    if summary is not None:
        (folder / "training_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    card = build_model_card(
        model,
        eval_results,
        training_summary=summary,
        dataset_repo=dataset_repo,
        figures=figures,
        repo_id=repo_id,
    )
    readme = folder / "README.md"
    card.save(readme)
    return readme


def write_model_folder(
    model: torch.nn.Module,
    folder: str | Path,
    eval_results: Mapping[str, Any],
    training_summary: Mapping[str, Any] | str | Path | None = None,
    video: str | Path | None = None,
    *,
    dataset_repo: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """A Hub-ready model folder: ``save_pretrained`` weights and config, the card (``README.md``), its figures, the
    evaluation results (``results.json``), the training summary and an optional rollout video.

    The inputs are checked before anything is written (:func:`write_card_files` first); the finished folder passes
    :func:`harmodt_hf.hub.push.validate_model_folder`, so ``push_model(folder, repo_id)`` accepts it.
    """
    from harmodt_hf.hub.push import validate_model_folder

    write_card_files(model, folder, eval_results, training_summary, video, dataset_repo=dataset_repo, repo_id=repo_id)
    model.save_pretrained(folder)
    validate_model_folder(folder)
    return Path(folder)


__all__ = [
    "CardError",
    "build_model_card",
    "check_eval_results",
    "mask_embedding",
    "mask_embedding_figure",
    "mask_overlap_figure",
    "plot_mask_embedding",
    "plot_mask_overlap",
    "write_card_files",
    "write_model_folder",
]
