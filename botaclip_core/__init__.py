"""BotaCLIP: botany-aware Earth-observation embeddings, as a library (no Prefect here)."""

__version__ = "0.1.0"
