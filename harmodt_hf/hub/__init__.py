"""The Hub: model cards and figures, model folders, and checked uploads of models and datasets."""
