"""Small shared builders for tests: tiny configs and random model inputs."""

from __future__ import annotations

import functools

import torch

from harmodt_hf import HarmoDTConfig, HarmoDTModel

TASKS = ["reach-v3", "push-v3", "pick-place-v3"]


@functools.cache
def small_matmuls_follow_row_count() -> bool:
    """Whether this CPU's one-thread ``F.linear`` gives a row different last bits when the matrix has more rows.

    On the AMX Xeon of earlier sessions the kernels were row-count invariant, so a batched forward matched each
    sample alone bit for bit; on an AVX2 EPYC a 2-row linear rounds differently from a 12-row one (~1e-7). Tests of
    "batching changes nothing" are exact where this returns ``False`` and allow float rounding where it is ``True``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        for rows, features in ((2, 39), (4, 32), (18, 32), (2, 256)):
            x = torch.randn(6 * rows, features, generator=g)
            weight, bias = torch.randn(32, features, generator=g), torch.randn(32, generator=g)
            whole = torch.nn.functional.linear(x, weight, bias)
            if not torch.equal(whole[:rows], torch.nn.functional.linear(x[:rows], weight, bias)):
                return True
        return False
    finally:
        torch.set_num_threads(threads)


def tiny_config(**overrides) -> HarmoDTConfig:
    """A model small enough for fast CPU tests (2 layers, d=32)."""
    kwargs = dict(
        task_names=TASKS,
        hidden_size=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        context_length=4,
        prompt_length=2,
        max_ep_len=100,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
    )
    kwargs.update(overrides)
    return HarmoDTConfig(**kwargs)


def random_inputs(config: HarmoDTConfig, task_ids, seed: int = 0, steps: int | None = None) -> dict:
    """A batch of random model inputs (with prompts when the config uses them) for the given task ids."""
    g = torch.Generator().manual_seed(seed)
    task_ids = torch.as_tensor(task_ids, dtype=torch.long)
    batch, length = len(task_ids), steps or config.context_length
    inputs = dict(
        states=torch.randn(batch, length, config.state_dim, generator=g),
        actions=torch.rand(batch, length, config.act_dim, generator=g) * 2 - 1,
        returns_to_go=torch.rand(batch, length, 1, generator=g) * 4,
        timesteps=torch.randint(0, config.max_ep_len - length, (batch, 1), generator=g) + torch.arange(length),
        attention_mask=torch.ones(batch, length, dtype=torch.long),
        task_ids=task_ids,
    )
    inputs["attention_mask"][0, :1] = 0  # left padding on one sample
    if config.use_prompt:
        p = config.prompt_length
        inputs["prompt"] = dict(
            states=torch.randn(batch, p, config.state_dim, generator=g),
            actions=torch.rand(batch, p, config.act_dim, generator=g) * 2 - 1,
            returns_to_go=torch.rand(batch, p, 1, generator=g),
            timesteps=torch.arange(p).repeat(batch, 1),
            attention_mask=torch.ones(batch, p, dtype=torch.long),
        )
    return inputs


def tiny_prompted_model(seed: int = 0, **overrides) -> HarmoDTModel:
    """A tiny HarmoDTModel (tasks reach, push, pick-place) with random weights and random stored prompts."""
    torch.manual_seed(seed)
    model = HarmoDTModel(tiny_config(**overrides)).eval()
    config = model.config
    if config.use_prompt:
        g = torch.Generator().manual_seed(seed + 1)
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
    return model


def capture_forward_inputs(model):
    """Record the keyword inputs of every forward of ``model``; returns ``(calls, hook handle)``."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items() if "prompt" not in k})
        calls[-1]["prompt"] = kwargs.get("prompt")
        calls[-1]["prompt_key_values"] = kwargs.get("prompt_key_values")

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def bool_tensor(values) -> torch.Tensor:
    """A bool tensor from nested lists of 0/1 (compact hand-written masks)."""
    return torch.tensor(values, dtype=torch.bool)


def float_tensor(values) -> torch.Tensor:
    """A float32 tensor from nested lists."""
    return torch.tensor(values, dtype=torch.float32)


def synthetic_episode_rows(task_names=TASKS, episodes: int = 3, length: int = 30, seed: int = 0) -> list[dict]:
    """In-memory episode rows (the columns of an episode dataset) for training tests without Meta-World: per task,
    observations around a task-specific offset and actions a fixed smooth function of them (something to learn).
    The training goldens (tests/golden) are computed on these rows: changing them means regenerating the goldens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(39, 4)) / 6
    rows = []
    for t, name in enumerate(task_names):
        for _ in range(episodes):
            obs = (rng.normal(size=(length, 39)) + t).astype(np.float32)
            rows.append(
                dict(
                    observations=obs,
                    actions=np.tanh((obs - t) @ weights).astype(np.float32),
                    rewards=rng.random(length).astype(np.float32),
                    task_name=name,
                )
            )
    return rows


def synthetic_trainer(output_dir, config_overrides: dict | None = None, model_init=None, **training_args):
    """A HarmoDTTrainer on the tiny config and :func:`synthetic_episode_rows` data (state stats from the data, stored
    evaluation prompts), ready to ``train()``. ``model_init(model)`` may re-initialise the model before training;
    ``training_args`` override the defaults below (``per_device_train_batch_size`` and ``max_steps`` included)."""
    from transformers import set_seed

    from harmodt_hf.training.segments import EpisodeBuffer, SegmentDataset, SegmentSampler
    from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

    buffer = EpisodeBuffer.from_episodes(synthetic_episode_rows(TASKS), TASKS)
    mean, std = buffer.state_stats()
    config = tiny_config(state_mean=mean.tolist(), state_std=std.tolist(), **(config_overrides or {}))
    defaults = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
        seed=0, max_steps=4, per_device_train_batch_size=6, task_sampling="all_tasks", learning_rate=1e-3,
        mask_update_interval=1000, mask_grad_batch_size=2, logging_steps=1,
    )  # fmt: skip
    args = HarmoDTTrainingArguments(**{**defaults, **training_args})
    set_seed(args.seed)
    model = HarmoDTModel(config)
    if model_init is not None:
        model_init(model)
    sampler = SegmentSampler(buffer, config)
    model.set_task_prompts({k: torch.from_numpy(v) for k, v in sampler.evaluation_prompts().items()})
    batch = args.per_device_train_batch_size
    dataset = SegmentDataset(sampler, args.max_steps * batch, batch, task_sampling=args.task_sampling, seed=args.seed)
    return HarmoDTTrainer(model=model, args=args, train_dataset=dataset)
