"""Prospector: the env contract, rules, JAX/C++ parity, native-core robustness, bots, replays."""

import os
import shutil
import subprocess
import sys
import sysconfig
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl.envs import make
from jaxrl.envs.prospector import bots, jax_env, native, replay
from jaxrl.envs.prospector import spec as S
from jaxrl.envs.prospector.evaluate import evaluate_policy

needs_native = pytest.mark.skipif(not native.available(), reason="C++ core not built")


def run_parity(num_envs: int, num_steps: int, max_steps: int, seed: int) -> dict:
    """Step the JAX and C++ cores side by side with mixed actions; count disagreements.

    Actions: a third uniform over [-3, 72) (out-of-range ones included), a third sampled from
    the action mask, a third from the greedy miner bot (long coherent trajectories that sell,
    repair, die in hazards and hit the time limit).
    """
    env_j, params = make("prospector", env_impl="jax", max_steps=max_steps)
    env_n, _ = make("prospector", env_impl="native", max_steps=max_steps)
    vstep_j = jax.vmap(env_j.step, in_axes=(None, 0, 0, None))

    @jax.jit
    def run(keys):
        obs_j, st_j = jax.vmap(env_j.reset, in_axes=(0, None))(keys, params)
        obs_n, st_n = jax.vmap(env_n.reset, in_axes=(0, None))(keys, params)
        bad0 = jnp.sum(obs_j != obs_n) + sum(
            jnp.sum(a != b) for a, b in zip(jax.tree.leaves(st_j), jax.tree.leaves(st_n)))

        def body(carry, key):
            st_j, st_n, obs, bad, counts = carry
            k1, k2, k3 = jax.random.split(key, 3)
            rand = jax.random.randint(k1, (num_envs,), -3, 72)
            masked = jax.random.categorical(k2, jnp.where(env_j.action_mask(st_j), 0.0, -1e9))
            scripted = jax.vmap(bots.greedy_miner, in_axes=(None, 0))(k3, obs)
            which = jnp.arange(num_envs) % 3
            action = jnp.where(which == 0, rand, jnp.where(which == 1, masked, scripted))
            out_j = vstep_j(key, st_j, action, params)
            out_n = env_n.step(key, st_n, action, params)  # batched call, no vmap needed
            (o_j, s_j, r_j, te_j, tr_j, i_j), (o_n, s_n, r_n, te_n, tr_n, i_n) = out_j, out_n
            f32bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint32)  # noqa: E731
            bad = bad + jnp.stack([
                jnp.sum(f32bits(o_j) != f32bits(o_n)),
                jnp.sum(f32bits(r_j) != f32bits(r_n)),
                jnp.sum(te_j != te_n) + jnp.sum(tr_j != tr_n),
                jnp.sum(f32bits(i_j["final_observation"]) != f32bits(i_n["final_observation"])),
                sum(jnp.sum(a != b) for a, b in zip(jax.tree.leaves(s_j), jax.tree.leaves(s_n))),
            ])
            counts = counts + jnp.stack([te_j.sum(), tr_j.sum(), s_j.ship[:, S.S_LAST_INVALID].sum()])
            return (s_j, s_n, o_j, bad, counts), None

        init = (st_j, st_n, obs_j, jnp.zeros(5, jnp.int32), jnp.zeros(3, jnp.int32))
        (_, _, _, bad, counts), _ = jax.lax.scan(
            body, init, jax.random.split(jax.random.PRNGKey(seed + 1), num_steps))
        return bad0, bad, counts

    bad0, bad, counts = jax.device_get(run(jax.random.split(jax.random.PRNGKey(seed), num_envs)))
    names = ["obs", "reward", "flags", "final_obs", "state"]
    return {"reset": int(bad0), **{n: int(b) for n, b in zip(names, bad)},
            "terminated": int(counts[0]), "truncated": int(counts[1]), "invalid": int(counts[2])}


# ---- contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["jax", pytest.param("native", marks=needs_native)])
def test_contract_shapes_dtypes_and_mask(impl):
    env, params = make("prospector", env_impl=impl)
    assert env.impl == impl and env.num_actions == S.N_ACTIONS == 69
    assert env.observation_shape == (S.OBS_DIM,) == (260,)
    obs, state = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
    assert obs.shape == (260,) and obs.dtype == jnp.float32
    obs, state, reward, terminated, truncated, info = jax.jit(env.step)(
        jax.random.PRNGKey(1), state, jnp.int32(S.A_WAIT), params)
    assert obs.shape == (260,) and reward.shape == () and reward.dtype == jnp.float32
    assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    assert info["final_observation"].shape == (260,)
    mask = env.action_mask(state, params)
    assert mask.shape == (69,) and mask.dtype == jnp.bool_ and bool(mask[S.A_WAIT])
    # Start: docked at station sector 0, full tank, empty hold.
    assert float(obs[11]) == 1.0 and float(obs[12]) == 1.0
    assert not mask[S.A_REFUEL] and not mask[S.A_SELL_ALL] and mask[S.A_WARP + 1]


@needs_native
def test_native_constants_match_spec():
    for name, value in native.constants().items():
        assert getattr(S, name) == value, name


def test_auto_picks_native_on_cpu_when_built():
    env, _ = make("prospector", env_impl="auto")
    assert env.impl == ("native" if native.available() else "jax")
    with pytest.raises(ValueError, match="env_impl"):
        make("prospector", env_impl="cuda")
    with pytest.raises(ValueError, match="unknown Prospector option"):
        make("prospector", max_step=5)


def test_gymnax_env_wrapped_to_six_tuple():
    env, params = make("CartPole-v1")
    assert env.num_actions == 2 and env.observation_shape == (4,)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    step = jax.jit(env.step)
    truncated_seen = False
    for i in range(600):  # always push right: the pole falls (terminated, not truncated)
        obs, state, reward, terminated, truncated, info = step(jax.random.PRNGKey(i), state, 1, params)
        assert reward.dtype == jnp.float32 and terminated.dtype == jnp.bool_
        truncated_seen |= bool(truncated)
        if terminated:
            break
    assert bool(terminated) and not truncated_seen
    with pytest.raises(ValueError, match="unknown environment"):
        make("CartPole-v9")


# ---- rules ------------------------------------------------------------------------------------
def test_invalid_and_out_of_range_actions_are_penalised_noops():
    env, params = make("prospector", env_impl="auto")  # parity covers the other core
    _, state = env.reset(jax.random.PRNGKey(3), params)
    step = jax.jit(lambda s, a: env.step(None, s, a, params))
    # Docked with an empty hold at a hazard-free station: selling is invalid.
    for action in (S.A_SELL, S.A_SELL_ALL, S.A_REFUEL, -1, 69, 10_000):
        _, new, reward, terminated, truncated, _ = step(state, jnp.int32(action))
        assert float(reward) == pytest.approx(-0.02)
        assert int(new.ship[S.S_LAST_INVALID]) == 1
        np.testing.assert_array_equal(new.ship[S.S_SECTOR : 11], state.ship[S.S_SECTOR : 11])
        np.testing.assert_array_equal(new.asteroids, state.asteroids)
    _, new, reward, *_ = step(state, jnp.int32(S.A_WAIT))
    assert float(reward) == 0.0 and int(new.ship[S.S_LAST_INVALID]) == 0


def test_action_mask_predicts_validity_exactly():
    env, params = make("prospector", env_impl="auto")
    n = 48
    _, states = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), n), params)

    @jax.jit
    def wander(states, key):  # reach varied states: random valid actions for 40 steps
        def body(st, k):
            a = jax.random.categorical(k, jnp.where(env.action_mask(st), 0.0, -1e9))
            st = jax.vmap(env.step, in_axes=(None, 0, 0, None))(k, st, a, params)[1]
            return st, None
        return jax.lax.scan(body, states, jax.random.split(key, 40))[0]

    states = wander(states, jax.random.PRNGKey(1))
    mask = env.action_mask(states)
    # Try every action in every state: one batched step over n x 69 copies.
    tiled = jax.tree.map(lambda x: jnp.repeat(x[:, None], S.N_ACTIONS, axis=1), states)
    actions = jnp.broadcast_to(jnp.arange(S.N_ACTIONS), (n, S.N_ACTIONS))
    step2 = jax.jit(jax.vmap(jax.vmap(env.step, in_axes=(None, 0, 0, None)), in_axes=(None, 0, 0, None)))
    invalid = step2(None, tiled, actions, params)[1].ship[..., S.S_LAST_INVALID]
    np.testing.assert_array_equal(np.asarray(invalid) == 1, ~np.asarray(mask))
    assert 5 < np.asarray(mask).sum(1).mean() < 60


def test_termination_and_truncation_are_separate():
    env, params = make("prospector", env_impl="auto", max_steps=40)
    n = 256
    obs, st = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(2), n), params)
    # Reckless: warp to the most hazardous reachable sector and mine at full power forever.
    hazard = (st.sectors & 3)

    @jax.jit
    def run(st):
        def body(st, k):
            mask = env.action_mask(st)
            target = jnp.argmax(hazard, axis=1)
            warp = S.A_WARP + target
            mine = S.A_MINE + 3 + 4 * jax.random.randint(k, (n,), 0, 8)
            here = st.ship[:, S.S_SECTOR] == target
            a = jnp.where(here, mine, warp)
            a = jnp.where(jnp.take_along_axis(mask, a[:, None], 1)[:, 0], a, S.A_WAIT)
            o, st2, r, te, tr, info = jax.vmap(env.step, in_axes=(None, 0, 0, None))(k, st, a, params)
            return st2, (te, tr, r, info["final_observation"][:, 2], st.ship[:, S.S_T])
        return jax.lax.scan(body, st, jax.random.split(jax.random.PRNGKey(5), 120))[1]

    te, tr, r, final_hull, t_before = map(np.asarray, run(st))
    assert te.sum() > 10 and tr.sum() > 10 and not (te & tr).any()
    assert (final_hull[te] == 0).all() and (final_hull[tr] > 0).all()
    assert (t_before[tr] == params.max_steps - 1).all()
    assert (r[te] <= -S.LOSS_PENALTY * S.REWARD_SCALE + 1e-3).all()


# ---- parity and the native core ------------------------------------------------------------
@needs_native
def test_jax_and_native_cores_are_bit_identical():
    got = run_parity(num_envs=2048, num_steps=110, max_steps=80, seed=0)
    assert {k: got[k] for k in ("reset", "obs", "reward", "flags", "final_obs", "state")} == dict.fromkeys(
        ("reset", "obs", "reward", "flags", "final_obs", "state"), 0), got
    # The run really exercised terminations, time limits and invalid actions.
    assert got["terminated"] > 50 and got["truncated"] > 500 and got["invalid"] > 10_000, got


@needs_native
def test_native_under_vmap_scan_and_shard_map_stays_local():
    env, params = make("prospector", env_impl="native")
    n = 64
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    obs, st = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    actions = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, 69)
    vstep = jax.vmap(env.step, in_axes=(None, 0, 0, None))
    ref = jax.jit(vstep)(keys[0], st, actions, params)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(partial(vstep, keys[0]), mesh=mesh, in_specs=(spec, spec, None),
                                    out_specs=spec))
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    args = (jax.tree.map(put, st), put(actions), params)
    out = sharded(*args)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = sharded.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "prospector_step_many" in hlo
    assert out[0].sharding.spec[0] == "data"

    # Nested vmap (seeds x envs) is still one batched call.
    keys2 = jax.random.split(jax.random.PRNGKey(2), 6).reshape(2, 3, 2)
    obs2, st2 = jax.vmap(jax.vmap(env.reset, in_axes=(0, None)), in_axes=(0, None))(keys2, params)
    assert obs2.shape == (2, 3, 260) and st2.asteroids.shape == (2, 3, 96)


@needs_native
def test_native_rejects_bad_input_clearly():
    env, params = make("prospector", env_impl="native")
    obs, st = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), 4), params)
    with pytest.raises(TypeError, match="integer"):
        env.step(None, st, jnp.array([0.0, jnp.nan, 1.0, 2.0]), params)
    with pytest.raises(ValueError, match="state.ship"):
        env.step(None, st, jnp.zeros(3, jnp.int32), params)
    bad = st.replace(ship=st.ship.at[2, S.S_SECTOR].set(99))
    with pytest.raises(Exception, match=r"env 2 has an out-of-range ship\[sector\]"):
        jax.block_until_ready(env.step(None, bad, jnp.zeros(4, jnp.int32), params))
    bad = st.replace(asteroids=st.asteroids.at[1, 5].set(-7))
    with pytest.raises(Exception, match="env 1 has an out-of-range asteroids"):
        jax.block_until_ready(env.step(None, bad, jnp.zeros(4, jnp.int32), params))
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(native.reset_many(jnp.zeros(2, jnp.uint32), max_steps=0))


def native_digest(num_envs: int, num_steps: int, max_steps: int, seed: int) -> np.ndarray:
    """Per-env wrapping sums of every output's bits over a native run with mixed actions."""
    env, params = make("prospector", env_impl="native", max_steps=max_steps)

    @jax.jit
    def run(keys):
        obs, st = jax.vmap(env.reset, in_axes=(0, None))(keys, params)

        def body(carry, key):
            st, acc = carry
            k1, k2 = jax.random.split(key)
            masked = jax.random.categorical(k1, jnp.where(env.action_mask(st), 0.0, -1e9))
            action = jnp.where(jnp.arange(num_envs) % 2 == 0, masked,
                               jax.random.randint(k2, (num_envs,), -5, 80))
            obs, st, r, te, tr, info = env.step(key, st, action, params)
            bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint32)  # noqa: E731
            acc = acc + jnp.stack([bits(obs).sum(1), bits(r), te + 2 * tr,
                                   bits(info["final_observation"]).sum(1),
                                   st.asteroids.astype(jnp.uint32).sum(1)], 1)
            return (st, acc), None

        init = (st, jnp.zeros((num_envs, 5), jnp.uint32))
        return jax.lax.scan(body, init, jax.random.split(jax.random.PRNGKey(seed), num_steps))[0][1]

    return np.asarray(run(jax.random.split(jax.random.PRNGKey(seed), num_envs)))


@needs_native
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_native_core_parity_under_address_and_ub_sanitizers(tmp_path):
    """Build the core with -fsanitize=address,undefined and without the AVX2 clones of its hot
    loops; it must match the regular build (which the parity test holds equal to the JAX core,
    and which runs the AVX2 clones on a CPU that has AVX2) and reject a corrupt state without UB."""
    lib = lambda name: subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True,  # noqa: E731
                                      text=True).stdout.strip()
    preload = [lib("libasan.so"), lib("libstdc++.so")]  # libstdc++ first-class, for __cxa_throw
    if not all(os.path.isabs(p) for p in preload):
        pytest.skip("libasan not available")
    so = tmp_path / ("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    src = Path(jax_env.__file__).with_name("prospector.cc")
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-DMULTIVERSIONED=",
         "-shared", "-fPIC",
         "-isystem", jax.ffi.include_dir(), "-I", sysconfig.get_paths()["include"], str(src),
         "-o", str(so)], check=True)
    args = dict(num_envs=500, num_steps=120, max_steps=50, seed=7)
    script = (
        "import sys, numpy as np, jax, jax.numpy as jnp; sys.path.insert(0, %r)\n"
        "from test_prospector import native_digest, make\n"
        "from jaxrl.envs.prospector import native\n"
        "assert native._import_module().__file__ == %r\n"
        "np.save(%r, native_digest(**%r))\n"
        "env, p = make('prospector', env_impl='native')\n"
        "o, st = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), 3), p)\n"
        "try:\n"
        "    jax.block_until_ready(env.step(None, st.replace(market=st.market.at[1, 3].set(-1)),"
        " jnp.full(3, 999), p))\n"
        "except Exception as e:\n"
        "    assert 'env 1 has an out-of-range market' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('corrupt state accepted')\n"
    ) % (str(Path(__file__).parent), str(so), str(tmp_path / "digest.npy"), args)
    env = {**os.environ, "LD_PRELOAD": " ".join(preload), "JAXRL_PROSPECTOR_NATIVE": str(so),
           "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime error" not in proc.stderr and "AddressSanitizer" not in proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "digest.npy"), native_digest(**args))


# ---- bots, evaluation, replays ---------------------------------------------------------------
def test_bots_beat_random_and_evaluation_is_seeded():
    env, params = make("prospector", env_impl="auto")
    random_ret = evaluate_policy(bots.random_policy, env, params, 64, seed=0)
    for name, bot in bots.BOTS.items():
        ret = evaluate_policy(bot, env, params, 64, seed=0)
        assert ret.shape == (64,)
        assert ret.mean() > random_ret.mean() + 30, name
        np.testing.assert_array_equal(ret, evaluate_policy(bot, env, params, 64, seed=0))
        assert not np.array_equal(ret, evaluate_policy(bot, env, params, 64, seed=1))


def test_replay_round_trip_matches_evaluation(tmp_path):
    env, params = make("prospector", env_impl="jax", max_steps=50)
    path = replay.record(tmp_path / "greedy.jsonl", bots.greedy_miner, env, params, seed=4,
                         episodes=2, policy_name="greedy_miner")
    header, steps = replay.read(path)
    assert header["format"] == replay.FORMAT and header["episodes"] == 2 and header["seed"] == 4
    assert {s["episode"] for s in steps} == {0, 1}
    last = [s for s in steps if s["episode"] == 0][-1]
    assert last["terminated"] or (last["truncated"] and last["t"] == 50)
    assert steps[0]["t"] == 1 and steps[0]["obs_summary"]["fuel"] == S.FUEL_MAX
    assert any(s["action_name"] == "sell all" for s in steps)
    assert all(0 <= s["ship"]["hull"] <= S.HULL_MAX for s in steps)
    expected = evaluate_policy(bots.greedy_miner, env, params, 2, seed=4)
    np.testing.assert_allclose(replay.episode_returns(steps), expected, rtol=1e-5, atol=1e-4)
    (tmp_path / "bad.jsonl").write_text('{"format": "other"}\n')
    with pytest.raises(ValueError, match="not a prospector-replay"):
        replay.read(tmp_path / "bad.jsonl")
