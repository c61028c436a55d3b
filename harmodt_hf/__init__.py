"""harmodt-hf: HarmoDT (Harmony Multi-Task Decision Transformer) for the Hugging Face ecosystem.

Importing the package registers ``model_type="harmodt"`` with ``AutoConfig`` and ``AutoModel``.
"""

from transformers import AutoConfig, AutoModel

from .configuration_harmodt import HarmoDTConfig
from .modeling_harmodt import HarmoDTModel, HarmoDTOutput, PromptKeyValues
from .trainer import HarmoDTTrainer, HarmoDTTrainingArguments

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
