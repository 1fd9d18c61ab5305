"""jaxrl: pure-JAX training for language models and reinforcement learning."""

import os


def _ynn_dots_only() -> None:
    """Keep XLA:CPU's YNNPACK kernels for dots only, unless the user chose a setting.

    jaxlib 0.10.2 also sends elementwise ops and reductions to `__ynn_fusion` kernels by
    default; those crash or hang on some x86-64 CPUs (jax-ml/jax#39257: broadcast-multiply-
    reduce through slinky's transpose) and gave NaN where a constant was folded into one (see
    docs/chunk_ttt.md), so they stay off. YNNPACK's dot kernels are what makes small matmuls
    fast on CPU (on a 2-core Xeon, against no YNN at all: CartPole PPO 96k -> 111-126k env
    steps/s, GPT-2 decode at batch 8 80 -> 113-124 tok/s). Must run before JAX starts its CPU
    backend, hence at import. Set `--xla_cpu_experimental_ynn_fusion_type=...` in XLA_FLAGS
    (empty: no YNN kernels) to choose otherwise.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=dot".strip()


_ynn_dots_only()
