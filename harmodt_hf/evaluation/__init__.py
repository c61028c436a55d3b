"""Evaluation: the acting policy, batched Meta-World rollouts (success rate per task) and their plots."""

from harmodt_hf.evaluation.policy import HarmoDTPolicy
from harmodt_hf.evaluation.rollouts import evaluate, plot_success

__all__ = ["HarmoDTPolicy", "evaluate", "plot_success"]
