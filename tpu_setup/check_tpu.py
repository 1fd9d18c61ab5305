"""Print this worker's TPU devices after joining the pod; fail if JAX sees no TPU.

On a pod `jax.distributed.initialize()` joins all workers, so this finishes only when every
worker runs it (tpu_setup/setup_pod.py runs it on all of them at once).
"""

import jax

jax.distributed.initialize()
devices = jax.devices()
assert devices[0].platform == "tpu", f"JAX found no TPU, only {devices}"
print(f"worker {jax.process_index()}/{jax.process_count()}: "
      f"{jax.local_device_count()} local, {jax.device_count()} total TPU devices")
