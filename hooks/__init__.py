"""vLLM integration. Everything that touches vLLM internals lives here."""
