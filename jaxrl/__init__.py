"""jaxrl: pure-JAX training for language models and reinforcement learning."""
