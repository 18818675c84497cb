"""llama2."""
