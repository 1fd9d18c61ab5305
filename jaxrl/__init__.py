"""jaxrl: pure-JAX training for language models and reinforcement learning."""

import os


def _avoid_ynn_fusions() -> None:
    """Turn off XLA:CPU's YNNPACK fusions unless the user chose a setting.

    jaxlib 0.10.2 sends dots, reductions and elementwise ops to `__ynn_fusion` kernels by
    default, and these crash or hang at run time on some x86-64 CPUs (jax-ml/jax#39257). The
    empty list disables them; GPT-2-sized matmuls are as fast without, small PPO programs
    about 20% slower on a 2-core Xeon. Must run before JAX starts its CPU backend, hence at
    import. Set `--xla_cpu_experimental_ynn_fusion_type=...` in XLA_FLAGS to choose otherwise.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=".strip()


_avoid_ynn_fusions()
