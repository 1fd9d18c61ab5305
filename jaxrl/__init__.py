"""jaxrl: pure-JAX training for language models and reinforcement learning."""

import flax

# jaxrl places parameters itself, from logical axis names and one rules table
# (`jaxrl.core.mesh`), so variables are created unplaced but keep their annotations.
flax.config.update("flax_always_shard_variable", False)
