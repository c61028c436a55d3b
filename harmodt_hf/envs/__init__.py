"""Meta-World environments: the factory (``make_env``, ``goals``), compiled-model reuse and the goal cache.

Importing this package imports MuJoCo; task names alone are in :mod:`harmodt_hf.tasks`.
"""

from harmodt_hf.envs.factory import goals, make_env

__all__ = ["goals", "make_env"]
