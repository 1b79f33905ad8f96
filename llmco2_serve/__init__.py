"""llmco2-serve: per-request energy and carbon for LLM serving (LLMCO2 method)."""

__version__ = "0.1.0"
