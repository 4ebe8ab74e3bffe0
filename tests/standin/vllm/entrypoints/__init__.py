"""Stand-in for vLLM in fault tests (see tests/standin/README)."""
