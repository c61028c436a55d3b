"""Model cards (harmodt_hf.hub.cards): Hub metadata with one eval result per task, figures, the model folder, errors."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TASKS, random_inputs, tiny_config
from huggingface_hub import ModelCard
from PIL import Image

from harmodt_hf import HarmoDTModel
from harmodt_hf.hub.cards import (
    CardError,
    build_model_card,
    mask_embedding,
    mask_embedding_figure,
    mask_overlap_figure,
    plot_mask_overlap,
    write_model_folder,
)
from harmodt_hf.hub.push import card_links, validate_model_folder
from harmodt_hf.model.masks import pairwise_iou

ROOT = Path(__file__).resolve().parents[1]
RATES = {"reach-v3": 0.9, "push-v3": 0.3, "pick-place-v3": 0.0}
SUMMARY = {
    "variant": "harmodt-f",
    "dataset": "data/mt",
    "dataset_config": "mt3-near-optimal",
    "episodes_per_task": [4, 4, 4],
    "max_steps": 123,
    "seed": 7,
    "task_sampling": "round_robin",
    "update_rule": "harmony",
    "mask_update_interval": 50,
    "final_loss": 0.0421,
}


def fake_results(rates: dict[str, float] = RATES, episodes: int = 10) -> dict:
    """A results dict shaped like harmodt_hf.evaluation.rollouts.evaluate's."""
    per_task = {}
    for i, (task, rate) in enumerate(rates.items()):
        successes = [e < round(rate * episodes) for e in range(episodes)]
        per_task[task] = {
            "success_rate": float(np.mean(successes)),
            "mean_return": 100.0 * (i + 1),
            "mean_episode_length": 250.0 - 10 * i,
            "episodes": episodes,
            "successes": successes,
            "target_return": 4500.0,
        }
    return {
        "mean_success_rate": float(np.mean([e["success_rate"] for e in per_task.values()])),
        "per_task": per_task,
        "tasks": list(rates),
        "seed": 3,
        "episodes_per_task": episodes,
        "max_steps": 500,
        "stop_on_success": True,
    }


@pytest.fixture
def model() -> HarmoDTModel:
    torch.manual_seed(0)
    model = HarmoDTModel(tiny_config(mask_seed=1)).eval()
    model.set_task_prompts(random_inputs(model.config, [0, 1, 2], seed=5)["prompt"])  # as training stores them
    return model


def _result_values(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}


# ------------------------------------------------------------------------------------------------------- metadata
def test_card_metadata_holds_every_task_and_the_mean(model):
    results = fake_results()
    card = build_model_card(model, results, training_summary=SUMMARY, dataset_repo="me/mt-data", repo_id="me/hdt")
    parsed = ModelCard(str(card))  # round trip through the YAML text
    data = parsed.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "reinforcement-learning"
    for tag in ("reinforcement-learning", "meta-world", "harmodt", "decision-transformer", "multi-task"):
        assert tag in data.tags
    assert data.datasets == ["me/mt-data"]
    assert data.model_name == "hdt"
    values = _result_values(parsed)
    assert len(parsed.data.eval_results) == len(TASKS) + 1
    for task, rate in RATES.items():
        assert values[(task, "success_rate")] == pytest.approx(100 * rate)
    mean_key = next(key for key in values if key[1] == "mean_success_rate")
    assert values[mean_key] == pytest.approx(100 * results["mean_success_rate"])
    assert all(r.task_type == "reinforcement-learning" for r in parsed.data.eval_results)


def test_card_body_tables_usage_and_citation(model):
    card = build_model_card(model, fake_results(), training_summary=SUMMARY, repo_id="me/hdt")
    text = card.text
    assert "| reach-v3 | 90.0 % | 9/10 |" in text
    assert "| push-v3 | 30.0 % | 3/10 |" in text
    assert "| pick-place-v3 | 0.0 % | 0/10 |" in text
    assert "Mean success rate: 40.0 %" in text
    for row in ("| variant | `harmodt-f` |", "| optimizer steps | 123 |", "| seed | 7 |", "round_robin", "`harmony`"):
        assert row in text
    assert "`data/mt`, config `mt3-near-optimal`" in text
    assert 'AutoModel.from_pretrained("me/hdt", trust_remote_code=True)' in text
    assert 'HarmoDTModel.from_pretrained("me/hdt")' in text
    assert "HarmoDTPolicy(model)" in text and "training/evaluate.py --model me/hdt" in text
    assert "arXiv" in text and "2405.18080" in text and "Hu, Shengchao" in text and "ICML" in text
    assert "datasets" not in card.data.to_dict()  # no dataset repo given


def test_card_usage_snippet_runs(model, tmp_path, monkeypatch):
    """The card's harmodt-hf example works on the written folder (the benchmark call shortened to one short episode;
    tests/test_remote_code.py runs the transformers-only example)."""
    folder = write_model_folder(model, tmp_path / "m", fake_results())
    text = (folder / "README.md").read_text()
    code = text.split("```python\n")[2].split("```", 1)[0]
    code = code.replace("path/to/this/model", str(folder)).replace("episodes_per_task=10", "episodes_per_task=1")
    code = code.replace("seed=0)\nprint", "seed=0, max_steps=3, num_workers=0)\nprint")
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)
    assert 0.0 <= namespace["results"]["mean_success_rate"] <= 1.0
    assert namespace["action"].shape == (4,)


# ------------------------------------------------------------------------------------------------------- figures
def _assert_real_png(path: Path, min_size=(400, 300)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        gray = np.asarray(image.convert("L"), dtype=np.float64)
    assert gray.std() > 10.0  # not blank
    assert (gray < 200).mean() > 0.005  # thousands of drawn pixels (axes, ticks, labels), not a lone speck


def test_figures_are_real_pngs(model, tmp_path):
    folder = write_model_folder(model, tmp_path / "m", fake_results())
    for name in ("success_per_task.png", "mask_overlap.png", "mask_embedding.png"):
        _assert_real_png(folder / "images" / name)


def test_mask_overlap_figure_shows_the_iou_of_every_task_pair(model):
    fig = mask_overlap_figure(model)
    ax, colorbar = fig.axes
    names = [t.removesuffix("-v3") for t in TASKS]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() and ax.get_ylabel() and "IoU" in ax.get_title()
    assert "IoU" in colorbar.get_ylabel()
    expected = pairwise_iou(model.get_task_masks()).numpy()
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), expected)
    cell_texts = [t.get_text() for t in ax.texts]
    assert cell_texts == [f"{v:.2f}" for v in expected.ravel()]


def test_mask_embedding_is_the_pca_of_the_masks(model):
    from sklearn.decomposition import PCA

    masks = model.get_task_masks()
    flat = torch.cat([m.reshape(len(TASKS), -1) for m in masks.values()], dim=1).double().numpy()
    pca = PCA(n_components=2).fit(flat)
    reference = pca.transform(flat)
    coords, ratio = mask_embedding(model)
    for k in range(2):
        sign = np.sign(coords[:, k] @ reference[:, k])
        np.testing.assert_allclose(coords[:, k], sign * reference[:, k], atol=1e-6)
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, atol=1e-9)

    fig = mask_embedding_figure(model)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [t.removesuffix("-v3") for t in TASKS]
    assert ax.get_xlabel().startswith("PC1") and ax.get_ylabel().startswith("PC2")
    np.testing.assert_allclose(ax.collections[0].get_offsets(), coords)


def test_mask_embedding_puts_tasks_with_equal_masks_together(model):
    masks = model.get_task_masks()
    masks = {name: torch.stack([m[0], m[0], m[2]]) for name, m in masks.items()}  # tasks 0 and 1 share a mask
    model.set_task_masks(masks)
    coords, _ = mask_embedding(model)
    np.testing.assert_allclose(coords[0], coords[1], atol=1e-9)
    assert np.linalg.norm(coords[0] - coords[2]) > 1.0


# ------------------------------------------------------------------------------------------------------- folder
def test_write_model_folder_is_hub_ready(model, tmp_path):
    video = tmp_path / "reach-v3_episode00_success.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    results = fake_results()
    folder = write_model_folder(model, tmp_path / "m", results, training_summary=SUMMARY, video=video)
    uploads = validate_model_folder(folder)
    text = (folder / "README.md").read_text()
    links = card_links(text)
    for expected in (
        "images/success_per_task.png",
        "images/mask_overlap.png",
        "images/mask_embedding.png",
        "videos/reach-v3_episode00_success.mp4",
    ):
        assert expected in links and expected in uploads
    assert "An evaluation episode of `reach-v3`" in text
    assert json.loads((folder / "results.json").read_text()) == results
    assert json.loads((folder / "training_summary.json").read_text()) == SUMMARY
    loaded = HarmoDTModel.from_pretrained(folder)
    inputs = random_inputs(model.config, [2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).action_preds, model(**inputs).action_preds, rtol=0, atol=0)
    card = ModelCard.load(folder / "README.md")
    assert {r.dataset_config for r in card.data.eval_results} >= set(TASKS)


def test_model_without_masks_skips_mask_figures(tmp_path):
    model = HarmoDTModel(tiny_config(mask_mode="none")).eval()
    folder = write_model_folder(model, tmp_path / "m", fake_results())
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["success_per_task.png"]
    text = (folder / "README.md").read_text()
    assert "no task masks" in text and "mask_overlap" not in text and "mask density" not in text
    assert "Prompt-DT" in text
    with pytest.raises(ValueError, match="no task masks"):
        plot_mask_overlap(model, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["per_task"].pop("push-v3"), r"lacks 1 of the model's 3 tasks: \['push-v3'\]"),
        (lambda r: r["per_task"].__setitem__("door-open-v3", dict(r["per_task"]["reach-v3"])), "not trained on"),
        (lambda r: r["per_task"]["reach-v3"].__setitem__("success_rate", 1.5), r"must be in \[0, 1\]"),
        (lambda r: r["per_task"]["reach-v3"].pop("mean_return"), "lacks 'mean_return'"),
        (lambda r: r.__setitem__("mean_success_rate", 0.99), "is not the mean"),
        (lambda r: r.pop("per_task"), "no 'per_task'"),
    ],
)
def test_bad_eval_results_are_clear_errors_and_write_nothing(model, tmp_path, mutate, message):
    results = fake_results()
    mutate(results)
    with pytest.raises(CardError, match=message):
        build_model_card(model, results)
    with pytest.raises(CardError, match=message):
        write_model_folder(model, tmp_path / "m", results)
    assert not (tmp_path / "m").exists()


def test_bad_figure_paths_and_video(model, tmp_path):
    with pytest.raises(CardError, match="relative path"):
        build_model_card(model, fake_results(), figures={"success": "/abs/plot.png"})
    with pytest.raises(CardError, match="relative path"):
        build_model_card(model, fake_results(), figures={"success": "../plot.png"})
    with pytest.raises(CardError, match="Unknown figure"):
        build_model_card(model, fake_results(), figures={"loss": "loss.png"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_model_folder(model, tmp_path / "m", fake_results(), video=tmp_path / "none.mp4")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------------- push CLI
def _push_cli():
    spec = importlib.util.spec_from_file_location("push_model_cli", ROOT / "training" / "push_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_push_cli_builds_a_missing_card_from_results(hub_server, model, tmp_path, capsys):
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps(SUMMARY))
    cli = _push_cli()
    repo_id = f"test-user/card-{uuid.uuid4().hex[:8]}"
    with pytest.raises(SystemExit):  # no README.md and no results to build one from
        cli.main([str(folder), repo_id])
    assert "no README.md" in capsys.readouterr().err
    assert repo_id not in hub_server.repo_ids("model")

    results_path = tmp_path / "eval.json"
    results_path.write_text(json.dumps(fake_results()))
    assert cli.main([str(folder), repo_id, "--results", str(results_path), "--dataset-repo", "me/data"]) == 0
    remote = hub_server.list_files(repo_id)
    assert {"README.md", "results.json", "images/mask_overlap.png", "config.json"} <= set(remote)
    card = ModelCard.load(repo_id)
    assert card.data.datasets == ["me/data"]
    assert {r.dataset_config for r in card.data.eval_results} >= set(TASKS)
    assert "| optimizer steps | 123 |" in card.text
