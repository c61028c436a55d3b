"""Training: the HarmoDT algorithm (outer mask loop), the Trainer that runs it, training segments and the CLI."""

from harmodt_hf.training.trainer import HarmoDTTrainer, HarmoDTTrainingArguments

__all__ = ["HarmoDTTrainer", "HarmoDTTrainingArguments"]
