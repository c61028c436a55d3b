"""Episode datasets: the parquet format and its loading, generation with Meta-World's experts, conversion of the
official data, and the dataset folder with its card."""

from harmodt_hf.data.loading import load_metaworld_dataset, load_stats, state_stats

__all__ = ["load_metaworld_dataset", "load_stats", "state_stats"]
