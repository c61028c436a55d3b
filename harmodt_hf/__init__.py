"""harmodt-hf: HarmoDT (Harmony Multi-Task Decision Transformer) for the Hugging Face ecosystem.

Importing the package registers ``model_type="harmodt"`` with ``AutoConfig`` and ``AutoModel``. Layout:
``harmodt_hf.model`` (config, model, masks), ``harmodt_hf.training`` (the algorithm and its Trainer),
``harmodt_hf.evaluation`` (policy and rollouts), ``harmodt_hf.envs`` (Meta-World environments), ``harmodt_hf.data``
(episode datasets) and ``harmodt_hf.hub`` (cards and uploads).
"""

from transformers import AutoConfig, AutoModel

from harmodt_hf.model import HarmoDTConfig, HarmoDTModel, HarmoDTOutput, PromptKeyValues
from harmodt_hf.training import HarmoDTTrainer, HarmoDTTrainingArguments

__version__ = "0.1.0"

AutoConfig.register(HarmoDTConfig.model_type, HarmoDTConfig, exist_ok=True)
AutoModel.register(HarmoDTConfig, HarmoDTModel, exist_ok=True)

__all__ = [
    "HarmoDTConfig",
    "HarmoDTModel",
    "HarmoDTOutput",
    "HarmoDTTrainer",
    "HarmoDTTrainingArguments",
    "PromptKeyValues",
    "__version__",
]
