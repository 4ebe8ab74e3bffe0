"""ephemera: run GPU test jobs for LLM serving on throw-away machines."""

__version__ = "0.1.0"
