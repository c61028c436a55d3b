"""harmodt-hf: HarmoDT (Harmony Multi-Task Decision Transformer) for the Hugging Face ecosystem."""

__version__ = "0.1.0"
