"""The model: configuration, the Prompt-DT body with task-masked layers, and the task masks themselves.

Self-contained (imports only torch, numpy, transformers and safetensors): this folder is the code a model on the Hub
needs to load with ``trust_remote_code=True``.
"""

from .configuration_harmodt import HarmoDTConfig
from .modeling_harmodt import HarmoDTModel, HarmoDTOutput, PromptKeyValues

__all__ = ["HarmoDTConfig", "HarmoDTModel", "HarmoDTOutput", "PromptKeyValues"]
