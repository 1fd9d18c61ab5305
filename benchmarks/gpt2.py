"""GPT-2 on CPU, jaxrl vs Hugging Face PyTorch side by side: a training step and greedy decoding.

    python benchmarks/gpt2.py --out benchmarks/results/gpt2.json    # 124M, 4x256, decode 32+128
    python benchmarks/gpt2.py --quick                               # tiny shapes, a smoke test
    python benchmarks/gpt2.py --check    # exit 1 when a ratio is below benchmarks/floors.json

Training: forward + backward + AdamW on random tokens, tokens/s and MFU. MFU divides the
model FLOPs/s (6N per token plus attention) by the best matmul throughput measured in this
same run (jax and torch, f32 and bf16, square matmuls), so it is relative to this machine.
Decoding: greedy, no early stop, tokens/s = batch * new tokens / wall time of the call.
Both sides use the same weights layout, shapes and thread count; medians of a few repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, make_optimizer
from jaxrl.models import onednn
from jaxrl.models.generate import generate
from jaxrl.models.gpt2 import GPT2, GPT2Config
from machine import check_floors, machine_info  # benchmarks/ is on sys.path when run as a script

SHAPES = {
    "full": dict(preset="124M", batch=4, seq=256, matmul=4096, prompt=32, new=128, decode_batches=(1, 8), repeats=2),
    "quick": dict(preset="tiny", batch=2, seq=64, matmul=512, prompt=8, new=16, decode_batches=(1, 4), repeats=2),
}


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(make_matmul, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n matmul; a probe at 256 shrinks n when n would take over ~5 s
    (bf16 without native CPU support can be 100x slower than f32)."""
    probe = 256
    gflops = 2 * probe**3 / median_seconds(make_matmul(probe), 1) / 1e9
    while n > probe and 2 * n**3 / (gflops * 1e9) > 5.0:
        n //= 2
    return 2 * n**3 / median_seconds(make_matmul(n), repeats) / 1e9


def matmul_peaks(n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of square matmuls per framework and dtype."""

    def jax_matmul(dtype):
        def make(size):
            a, matmul = jnp.ones((size, size), dtype), jax.jit(lambda x: x @ x)
            return lambda: matmul(a).block_until_ready()

        return make

    def torch_matmul(dtype):
        def make(size):
            a = torch.ones((size, size), dtype=dtype)
            return lambda: a @ a

        return make

    def onednn_matmul(size):
        a, matmul = jnp.ones((size, size), jnp.bfloat16), jax.jit(lambda x: onednn.matmul_bf16(x, x))
        return lambda: matmul(a).block_until_ready()

    peaks = {
        "jax_f32": matmul_gflops(jax_matmul(jnp.float32), n, repeats),
        "jax_bf16": matmul_gflops(jax_matmul(jnp.bfloat16), n, repeats),
        "torch_f32": matmul_gflops(torch_matmul(torch.float32), n, repeats),
        "torch_bf16": matmul_gflops(torch_matmul(torch.bfloat16), n, repeats),
    }
    if onednn.unavailable() is None:
        peaks["jaxrl_onednn_bf16"] = matmul_gflops(onednn_matmul, n, repeats)
    return peaks


def train_flops_per_token(cfg: GPT2Config, seq: int) -> float:
    """6 * (params in matmuls, incl. the tied output projection) + attention scores and mixing."""
    d, L = cfg.n_embd, cfg.n_layer
    matmul_params = L * 12 * d * d + cfg.vocab_size * d
    return 6 * matmul_params + 12 * L * seq * d


def hf_config(cfg: GPT2Config) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


# --- training -------------------------------------------------------------------------------


def jax_train_step_seconds(cfg: GPT2Config, tokens: np.ndarray, repeats: int) -> float:
    graphdef, params = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)))  # split once; the step merges
    tx = make_optimizer(OptimizerConfig(lr=3e-4, warmup_steps=0, clip_norm=0.0))
    opt_state = tx.init(params)

    @jax.jit(donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens = jnp.asarray(tokens)
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], tokens)
        loss.block_until_ready()

    return median_seconds(run, repeats)


def torch_train_step_seconds(cfg: GPT2Config, tokens: np.ndarray, repeats: int, mode: str) -> float:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config(cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tokens = torch.tensor(tokens, dtype=torch.long)

    def forward_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()

    if mode == "compile":
        forward_backward = torch.compile(forward_backward)

    def run():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(run, repeats, warmup=2 if mode == "compile" else 1)


# --- decoding -------------------------------------------------------------------------------


def jax_decode_seconds(cfg: GPT2Config, prompt: np.ndarray, new: int, repeats: int) -> float:
    graphdef, params = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)))
    mask = jnp.ones(prompt.shape, jnp.int32)
    prompt = jnp.asarray(prompt)

    def run():
        out = generate(
            graphdef, params, prompt, mask, jax.random.key(0), max_new_tokens=new, temperature=0.0, eos_id=-1
        )
        out.tokens.block_until_ready()

    return median_seconds(run, repeats)


def torch_decode_seconds(cfg: GPT2Config, prompt: np.ndarray, new: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config(cfg)).eval()
    prompt = torch.tensor(prompt, dtype=torch.long)

    def run():
        with torch.no_grad():
            model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip

    return median_seconds(run, repeats)


# --- main -----------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    args = parser.parse_args()
    shapes = SHAPES["quick" if args.quick else "full"]
    repeats = shapes["repeats"]
    cfg = GPT2Config.preset(shapes["preset"])
    rng = np.random.default_rng(0)

    results = {
        "shapes": shapes,
        "machine": {
            **machine_info(),
            "torch_threads": torch.get_num_threads(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "matmul_gflops": matmul_peaks(shapes["matmul"], repeats),
    }
    peak = max(results["matmul_gflops"].values())

    tokens = rng.integers(0, cfg.pad_id, (shapes["batch"], shapes["seq"])).astype(np.int32)
    flops_per_token = train_flops_per_token(cfg, shapes["seq"])
    train = {}
    runs = {
        "jaxrl_f32": lambda: jax_train_step_seconds(cfg, tokens, repeats),
        "jaxrl_bf16": lambda: jax_train_step_seconds(dataclasses.replace(cfg, dtype="bfloat16"), tokens, repeats),
        "torch_eager_f32": lambda: torch_train_step_seconds(cfg, tokens, repeats, "eager"),
    }
    if onednn.unavailable() is None:  # GPT2Config(matmul="onednn"): oneDNN's bf16 products
        runs["jaxrl_bf16_onednn"] = lambda: jax_train_step_seconds(
            dataclasses.replace(cfg, dtype="bfloat16", matmul="onednn"), tokens, repeats)
        results["machine"]["onednn"] = {
            "version": onednn.require().version(),
            "kernel": onednn.implementation(shapes["batch"] * shapes["seq"], 4 * cfg.n_embd, cfg.n_embd)}
    else:
        train["jaxrl_bf16_onednn"] = {"error": onednn.unavailable()}
    peaks = results["matmul_gflops"]
    if peaks["torch_bf16"] >= 0.5 * peaks["torch_f32"]:
        runs["torch_bf16_autocast"] = lambda: torch_train_step_seconds(cfg, tokens, repeats, "bf16_autocast")
    if not args.no_compile:
        runs["torch_compile_f32"] = lambda: torch_train_step_seconds(cfg, tokens, repeats, "compile")
    if "torch_bf16_autocast" not in runs:
        train["torch_bf16_autocast"] = {
            "error": f"skipped: torch bf16 matmul {peaks['torch_bf16']:.1f} GFLOP/s vs f32 "
            f"{peaks['torch_f32']:.1f} (no native bf16 on this CPU); a step would take hours"
        }
    for name, run in runs.items():
        try:
            seconds = run()
        except Exception as error:  # torch.compile needs a C++ toolchain; report, don't abort
            train[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            continue
        tokens_per_second = tokens.size / seconds
        train[name] = {
            "step_s": seconds,
            "tokens_per_s": tokens_per_second,
            "mfu": tokens_per_second * flops_per_token / (peak * 1e9),
        }
        print(f"train {name}: {tokens_per_second:.0f} tok/s", flush=True)
    results["train"] = train

    decode = {}
    for batch in shapes["decode_batches"]:
        prompt = rng.integers(0, cfg.pad_id, (batch, shapes["prompt"])).astype(np.int32)
        for name, fn in [("jaxrl", jax_decode_seconds), ("hf_generate", torch_decode_seconds)]:
            seconds = fn(cfg, prompt, shapes["new"], repeats)
            decode[f"{name}_b{batch}"] = {"seconds": seconds, "tokens_per_s": batch * shapes["new"] / seconds}
            print(f"decode {name} batch {batch}: {batch * shapes['new'] / seconds:.1f} tok/s", flush=True)
    results["decode"] = decode

    def best(side, bf16):  # tok/s of one side's fastest row in f32 or in bf16 (0: none ran)
        return max((v.get("tokens_per_s", 0) for k, v in train.items()
                    if k.startswith(side) and ("bf16" in k) == bf16), default=0)

    results["ratios"] = {
        "train_jaxrl_best_over_torch_best": max(best("jaxrl", False), best("jaxrl", True))
        / max(best("torch", False), best("torch", True)),
        "train_f32_jaxrl_over_torch_f32": best("jaxrl", False) / best("torch", False),
        **({"train_bf16_jaxrl_over_torch_bf16": best("jaxrl", True) / best("torch", True)}
           if best("torch", True) else {}),
        **{
            f"decode_b{b}_jaxrl_over_hf": decode[f"jaxrl_b{b}"]["tokens_per_s"] / decode[f"hf_generate_b{b}"]["tokens_per_s"]
            for b in shapes["decode_batches"]
        },
    }

    print("\nsquare matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in results["matmul_gflops"].items()))
    print(f"\n{'train ' + shapes['preset'] + ' ' + str(shapes['batch']) + 'x' + str(shapes['seq']):<28}{'tok/s':>10}{'MFU':>8}")
    for name, row in train.items():
        if "error" in row:
            print(f"{name:<28}{'n/a':>10}  {row['error'][:60]}")
        else:
            print(f"{name:<28}{row['tokens_per_s']:>10.1f}{row['mfu']:>8.1%}")
    print(f"\n{'decode ' + str(shapes['prompt']) + '+' + str(shapes['new']):<28}{'tok/s':>10}")
    for name, row in decode.items():
        print(f"{name:<28}{row['tokens_per_s']:>10.1f}")
    print("\n" + ", ".join(f"{k} {v:.2f}x" for k, v in results["ratios"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return check_floors("gpt2", results["ratios"],
                        machine=results["machine"]) if args.check and not args.quick else 0


if __name__ == "__main__":
    raise SystemExit(main())
