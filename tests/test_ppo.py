"""PPO: GAE and loss arithmetic by hand, truncation bootstrapping end to end, action masks,
exact resume through a checkpoint, and CartPole-v1 solved by two seeds trained side by side in one step;
continuous actions (Gaussian head, Pendulum-v1 learns), unservable action spaces refused,
normalisation statistics resumed exactly, target_kl early stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct
from gymnax.environments import environment, spaces

from jaxrl import envs
from jaxrl.algorithms.ppo import (
    PPO, PPOConfig, RunningStats, clipped_policy_loss, evaluate, explained_variance, gae,
    value_loss,
)
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.core.config import ConfigError
from jaxrl.models.policy import ActorCritic, Categorical, Gaussian
from jaxrl.recipes.ppo import seed_axis


def test_gae_bootstraps_through_truncation_but_not_termination():
    rewards = jnp.array([1.0, 1.0, 1.0])
    values = jnp.array([0.5, 0.6, 0.7])
    next_values = jnp.array([0.6, 2.0, 0.9])  # step 1 ends an episode; V(final obs) = 2.0
    done = jnp.array([False, True, False])
    kw = dict(gamma=0.9, lam=0.8)

    # Truncated at step 1: bootstrap 0.9 * 2.0 there, but do not carry step 2's advantage back.
    adv, targets = gae(rewards, values, next_values, jnp.zeros(3, bool), done, **kw)
    np.testing.assert_allclose(adv, [1.04 + 0.72 * 2.2, 2.2, 1.11], rtol=1e-6)
    np.testing.assert_allclose(targets, adv + values, rtol=1e-6)

    # Terminated at step 1: no bootstrap, delta_1 = 1 - 0.6.
    adv, _ = gae(rewards, values, next_values, done, done, **kw)
    np.testing.assert_allclose(adv, [1.04 + 0.72 * 0.4, 0.4, 1.11], rtol=1e-6)

    # No episode end: the plain lambda-return recursion over all three steps.
    adv, _ = gae(rewards, values, next_values, jnp.zeros(3, bool), jnp.zeros(3, bool), **kw)
    d = [1.04, 2.2, 1.11]
    a2 = d[2]
    a1 = d[1] + 0.72 * a2
    np.testing.assert_allclose(adv, [d[0] + 0.72 * a1, a1, a2], rtol=1e-6)


def test_clipped_policy_loss_takes_the_pessimistic_side():
    old = jnp.log(jnp.array([0.5, 0.5, 0.5, 0.5]))
    new = jnp.log(jnp.array([0.75, 0.75, 0.25, 0.25]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = jnp.array([1.0, -1.0, 1.0, -1.0])
    # eps=0.2: r*A = [1.5, -1.5, 0.5, -0.5]; clip(r)*A = [1.2, -1.2, 0.8, -0.8];
    # min = [1.2, -1.5, 0.5, -0.8] -> loss = -mean = -(-0.6) / 4
    loss = clipped_policy_loss(new, old, adv, clip_eps=0.2)
    np.testing.assert_allclose(loss, -(1.2 - 1.5 + 0.5 - 0.8) / 4, rtol=1e-6)
    # Inside the trust region the surrogate is plain r*A and its gradient is A/N.
    grad = jax.grad(clipped_policy_loss)(old, old, adv, 0.2)
    np.testing.assert_allclose(grad, -adv / 4, rtol=1e-6)
    # Clipped terms (ratio pushed past 1 +- eps in the advantage's direction) get no gradient;
    # the others get d(-r A / N)/d log p = -r A / N.
    grad = jax.grad(clipped_policy_loss)(new, old, adv, 0.2)
    np.testing.assert_allclose(grad, [0.0, 1.5 / 4, -0.5 / 4, 0.0], atol=1e-6)


def test_value_loss_clipping_is_pessimistic():
    target, old = jnp.array([1.0]), jnp.array([0.0])
    # New value 0.5 moves 0.5 > eps=0.2 toward the target: clipped error (0.8^2) is larger.
    np.testing.assert_allclose(value_loss(jnp.array([0.5]), old, target, 0.2), 0.5 * 0.64)
    np.testing.assert_allclose(value_loss(jnp.array([0.5]), old, target, None), 0.5 * 0.25)


class ClockState(struct.PyTreeNode):
    time: jax.Array


class ConstantRewardEnv:
    """Reward 1 every step, episodes only ever *truncated* after 10 steps, observation constant.

    With correct bootstrapping V = 1 / (1 - gamma) (the time limit is not part of the task);
    treating truncation as termination instead fits the mean truncated return, far lower.
    """

    num_actions = 2
    observation_shape = (1,)
    default_params = None

    def reset(self, key, params):
        return jnp.ones(1), ClockState(time=jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        time = state.time + 1
        truncated = time >= 10
        obs = jnp.ones(1)
        info = {"final_observation": obs}
        new_state = ClockState(time=jnp.where(truncated, 0, time))
        return obs, new_state, jnp.float32(1.0), jnp.bool_(False), truncated, info

    def __repr__(self):
        return "ConstantRewardEnv()"


def test_value_bootstraps_through_time_limit_end_to_end():
    gamma = 0.9
    cfg = PPOConfig(num_envs=4, rollout_steps=20, epochs=4, minibatches=2, gamma=gamma, lr=3e-2,
                    anneal_lr=False, clip_value=False, max_grad_norm=100.0)
    env = ConstantRewardEnv()
    ppo = PPO(env, None, lambda k: ActorCritic(1, 2, hidden=(8,), rngs=nnx.Rngs(k)), cfg, 60)
    state = jax.jit(ppo.init)(jax.random.key(0))
    update = jax.jit(ppo.update)
    for i in range(60):
        state, metrics = update(state, jax.random.key(i))
    value = float(ppo.model(state.params).value(jnp.ones((1, 1)))[0])
    # 1/(1-0.9) = 10; truncation-as-termination would give ~4.1 (mean of 10(1 - 0.9^k), k=1..10).
    assert value == pytest.approx(1 / (1 - gamma), rel=0.1)
    assert float(metrics["episode_length"]) == 10


class MaskedBandit:
    """One-step episodes; only actions 2 and 4 are legal, and action 0 (illegal) pays most."""

    num_actions = 5
    observation_shape = (3,)
    default_params = None

    def reset(self, key, params):
        return jnp.zeros(3), ClockState(time=jnp.zeros((), jnp.int32))

    def action_mask(self, state, params):
        return jnp.array([False, False, True, False, True])

    def step(self, key, state, action, params):
        reward = jnp.where(action == 0, 10.0, jnp.where(action == 4, 1.0, 0.0))
        obs = jnp.zeros(3)
        state = ClockState(time=state.time + 1)  # counts steps: state a checkpoint must keep
        return obs, state, reward, jnp.bool_(True), jnp.bool_(False), {"final_observation": obs}


@pytest.fixture(scope="module")
def bandit():
    """A small masked-env PPO and its compiled functions, shared to compile once."""
    cfg = PPOConfig(num_envs=16, rollout_steps=8, epochs=2, minibatches=2, lr=1e-2)
    ppo = PPO(MaskedBandit(), None, lambda k: ActorCritic(3, 5, rngs=nnx.Rngs(k)), cfg, 30)
    return ppo, jax.jit(ppo.init), jax.jit(ppo.update)


def test_action_mask_limits_sampling_and_learning(bandit):
    ppo, init, update = bandit
    state = init(jax.random.key(0))
    _, traj = jax.jit(ppo.rollout)(state, jax.random.key(1))
    assert set(np.unique(traj.action)) == {2, 4}
    for i in range(30):
        state, metrics = update(state, jax.random.key(i))
        assert np.isfinite(float(metrics["entropy"]))
    assert float(metrics["reward_per_step"]) > 0.9  # learned the best *legal* action
    assert float(metrics["minibatches_done"]) == 2 * 2  # no target_kl: every epoch, every minibatch


def test_update_resumes_exactly_from_a_checkpoint(bandit, tmp_path):
    """Params, optimizer (incl. the lr-schedule count), env state, obs and action masks all
    round-trip through an Orbax checkpoint: the next update is bit-identical."""
    ppo, init, update = bandit
    state = init(jax.random.key(0))
    for i in range(2):
        state, _ = update(state, jax.random.key(i))
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, state)
    restored, _, _ = ckpt.restore(init(jax.random.key(99)))
    ckpt.close()
    assert int(restored.env_state.time[0]) == 2 * 8
    straight, _ = update(state, jax.random.key(2))
    resumed, _ = update(restored, jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def _cartpole_ppo(num_updates: int) -> PPO:
    env, params = envs.make("CartPole-v1")
    cfg = PPOConfig(num_envs=4, rollout_steps=128, epochs=4, minibatches=4, lr=2.5e-4)
    model = lambda k: ActorCritic(4, env.num_actions, hidden=(64, 64), rngs=nnx.Rngs(k))  # noqa: E731
    return PPO(env, params, model, cfg, num_updates)


def test_config_rejects_minibatches_that_do_not_divide_the_batch():
    with pytest.raises(ConfigError, match="minibatches"):
        PPOConfig(num_envs=3, rollout_steps=5, minibatches=4).validate()


def _seeds_run(ppo: PPO, seeds: int, num_updates: int):
    """A whole run over `seeds` side by side in one jit: the recipe's `run.seeds` step,
    scanned (the whole-run shape that wedged XLA's CPU runtime when vmapped, see FIELD_NOTES)."""
    init, update, _ = seed_axis(ppo, seeds)

    @jax.jit
    def train(key):
        states = init(key)
        return jax.lax.scan(lambda s, i: update(s, jax.random.fold_in(key, i)), states,
                            jnp.arange(num_updates))
    return train


def test_cartpole_solved_by_two_seeds_trained_in_one_step():
    """5e5 env steps per seed (PureJaxRL's CartPole budget); greedy evaluation over 32
    fresh episodes per seed, each up to the 500-step limit."""
    num_updates = 976  # 976 * 4 envs * 128 steps ~= 5e5
    ppo = _cartpole_ppo(num_updates)
    states, metrics = _seeds_run(ppo, 2, num_updates)(jax.random.key(0))

    def greedy_returns(params):
        act = lambda k, obs, mask: ppo.act(params, k, obs, mask)  # noqa: E731
        reset_keys = jax.random.split(jax.random.key(7), 32)
        return evaluate(ppo.env, ppo.env_params, act, reset_keys, jax.random.key(8),
                        max_steps=500)

    returns = jax.jit(lambda p: jax.lax.map(greedy_returns, p))(states.params)
    assert returns.shape == (2, 32)
    assert np.all(returns.mean(axis=1) >= 475), returns.mean(axis=1)
    # The sampling (training) policy got there too, not only its argmax.
    for seed in (0, 1):
        assert metrics[f"seed{seed}/episode_return"][-10:].mean() >= 400
    np.testing.assert_allclose(metrics["loss"], (metrics["seed0/loss"] + metrics["seed1/loss"]) / 2,
                               rtol=1e-5)


@pytest.mark.timeout(240)
def test_whole_multi_seed_runs_finish_every_time():
    """The multi-seed program run again and again (a wedge shows as a timeout, not a pass)."""
    train = _seeds_run(_cartpole_ppo(8), 8, 8)
    for run in range(3):
        _, metrics = train(jax.random.key(run))
        assert np.all(np.isfinite(metrics["loss"]))


def test_run_seeds_trains_seeds_side_by_side_each_logged(tmp_path):
    import json

    from jaxrl.launch import main

    rc = main(["configs/ppo_cartpole.yaml", f"run.dir={tmp_path}", "run.seeds=2", "loop.steps=2",
               "loop.progress=false", "loop.log_every=1", "ppo.num_envs=8", "ppo.rollout_steps=8",
               "eval.episodes=8"])
    assert rc == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["returns"]) == {"ppo", "ppo seed0", "ppo seed1"}
    assert result["env_steps"] == 2 * 8 * 8 * 2 and result["seeds"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert r["seed0/loss"] != r["seed1/loss"]  # two seeds, not one copied
        assert r["loss"] == pytest.approx((r["seed0/loss"] + r["seed1/loss"]) / 2, rel=1e-5)
    assert any("seed1/eval_return_mean" in r for r in rows)
    # A recipe that trains one seed refuses rather than silently training one.
    assert main(["configs/sft_gpt2_shakespeare.yaml", "run.seeds=2"]) == 2


def test_ppo_evaluator_plays_the_same_episodes_as_the_bot_evaluator():
    """The recipe scores PPO with `evaluate` and the bots with `evaluate_policy`: on the same
    seed both must replay identical episodes, or the comparison table would be unfair."""
    from jaxrl.envs.prospector.bots import BOTS
    from jaxrl.envs.prospector.evaluate import evaluate_policy

    env, params = envs.make("prospector", env_impl="jax")
    bot = BOTS["greedy_miner"]
    expected = evaluate_policy(bot, env, params, 8, 3)
    act = lambda k, obs, mask: jax.vmap(bot, (0, 0, None))(  # noqa: E731
        jax.random.split(k, obs.shape[0]), obs, None)
    got = evaluate(env, params, act, jax.random.split(jax.random.PRNGKey(3), 8),
                   jax.random.key(0), max_steps=params.max_steps)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_launch_prospector_recipe_trains_and_reports(tmp_path, capsys):
    """The quickstart wiring, shrunk: config -> loop -> checkpoint -> evaluation -> table.
    (The bots' rows are left out here only because compiling them is slow on 2 cores.)"""
    import json

    from jaxrl.launch import main

    rc = main(["configs/ppo_prospector.yaml", f"run.dir={tmp_path}", "loop.steps=2",
               "loop.progress=false", "ppo.num_envs=8", "ppo.rollout_steps=8",
               "eval.episodes=8", "eval.baselines=false"])
    assert rc == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["returns"]) == {"ppo"}
    assert result["env_steps"] == 2 * 8 * 8 and result["env_impl"] in ("jax", "native")
    assert "ppo" in capsys.readouterr().out
    assert "episode_return" in (tmp_path / "metrics.jsonl").read_text()
    assert (tmp_path / "checkpoints").is_dir()


def test_running_stats_match_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (n, 2)).astype(np.float32) for n in (5, 17, 40)]
    stats = RunningStats.zeros((2,))
    for b in batches:
        stats = stats.update(jnp.asarray(b))
    every = np.concatenate(batches)
    np.testing.assert_allclose(stats.mean, every.mean(0), rtol=1e-4)
    np.testing.assert_allclose(stats.var, every.var(0), rtol=1e-3)
    assert float(stats.normalize(jnp.full(2, 1e6)).max()) == 10.0  # clipped


def test_explained_variance():
    y = jnp.array([1.0, 2.0, 3.0, 4.0])
    assert float(explained_variance(y, y)) == 1.0
    assert float(explained_variance(jnp.full(4, 2.5), y)) == pytest.approx(0.0)
    assert float(explained_variance(y, jnp.ones(4))) == 0.0  # constant targets: undefined


def test_gaussian_log_prob_is_of_the_unclipped_sample_and_the_env_gets_clipped_actions():
    env, params = envs.make("Pendulum-v1")
    assert env.action_spec.continuous and env.action_spec.low == (-2.0,)
    ppo = PPO(env, params, lambda k: ActorCritic(3, 1, continuous=True, rngs=nnx.Rngs(k)),
              PPOConfig(num_envs=2, rollout_steps=4, minibatches=1), 1)
    np.testing.assert_array_equal(ppo.env_action(jnp.array([[5.0], [-3.0], [0.5]])),
                                  [[2.0], [-2.0], [0.5]])
    dist = Gaussian(jnp.array([[0.0, 1.0]]), jnp.log(jnp.array([2.0, 0.5])))
    action = jnp.array([[3.0, -1.0]])  # outside any bound: still scored as sampled
    expected = (jax.scipy.stats.norm.logpdf(3.0, 0.0, 2.0)
                + jax.scipy.stats.norm.logpdf(-1.0, 1.0, 0.5))
    np.testing.assert_allclose(dist.log_prob(action), [expected], rtol=1e-6)
    # The actor's mean gets a gradient through the log-prob (the bug this head fixes: a
    # 1-way categorical over a Box space had none).
    model = ActorCritic(3, 1, continuous=True, rngs=nnx.Rngs(0))
    grads = nnx.grad(lambda m: m(jnp.ones((4, 3)))[0].log_prob(jnp.ones((4, 1))).sum())(model)
    assert float(jnp.abs(grads.actor.head.kernel[...]).sum()) > 0
    assert float(jnp.abs(grads.log_std[...]).sum()) > 0


class TupleActionEnv(environment.Environment):
    """A gymnax env whose actions are a pair of choices: no jaxrl policy emits that."""

    def action_space(self, params=None):
        return spaces.Tuple([spaces.Discrete(2), spaces.Discrete(3)])

    def observation_space(self, params=None):
        return spaces.Box(-1.0, 1.0, (2,))

    @property
    def name(self):
        return "TupleActionEnv"

    @property
    def num_actions(self):
        return 2


def test_an_action_space_no_policy_serves_is_a_config_error():
    with pytest.raises(ConfigError, match="action space.*Discrete.*Box"):
        envs.GymnaxEnv(TupleActionEnv(), None)


def _pendulum_ppo(num_updates: int, **overrides) -> PPO:
    """Settings that learn Pendulum-v1 in 1e5 steps (CleanRL's head and normalisation,
    gamma 0.9 as in rl-zoo's Pendulum entries, more minibatch steps per sample)."""
    env, params = envs.make("Pendulum-v1")
    cfg = PPOConfig(**{**dict(num_envs=4, rollout_steps=256, epochs=10, minibatches=16,
                              gamma=0.9, lr=1e-3, ent_coef=0.0, normalize_observations=True,
                              normalize_rewards=True), **overrides})
    model = lambda k: ActorCritic(3, 1, continuous=True, hidden=(64, 64), rngs=nnx.Rngs(k))  # noqa: E731
    return PPO(env, params, model, cfg, num_updates)


def test_pendulum_learns_with_the_gaussian_head():
    """~1e5 env steps: the greedy return on 32 fixed episodes rises from about -1200 (the
    initial policy) to better than -400."""
    num_updates = 98  # x 4 envs x 256 steps ~= 1e5
    ppo = _pendulum_ppo(num_updates)

    def greedy_returns(state):
        act = lambda k, obs, mask: ppo.act(state.params, k, obs, mask,  # noqa: E731
                                           obs_stats=state.obs_stats)
        return evaluate(ppo.env, ppo.env_params, act, jax.random.split(jax.random.key(7), 32),
                        jax.random.key(8), max_steps=200).mean()

    @jax.jit
    def train(key):
        state = ppo.init(key)
        before = greedy_returns(state)
        state, metrics = jax.lax.scan(
            lambda s, i: ppo.update(s, jax.random.fold_in(key, i)), state,
            jnp.arange(num_updates))
        return before, greedy_returns(state), metrics

    before, after, metrics = train(jax.random.key(0))
    assert float(before) < -900, before
    assert float(after) > -400 and float(after - before) > 600, (before, after)
    assert float(metrics["explained_variance"][-10:].mean()) > 0.5


def test_normalisation_statistics_resume_exactly(tmp_path):
    """Observation and return statistics (and the per-env discounted return) round-trip
    through a checkpoint: 2 updates + save + restore + 2 equals 4 straight."""
    ppo = _pendulum_ppo(4, rollout_steps=16, epochs=1, minibatches=2)
    init, update = jax.jit(ppo.init), jax.jit(ppo.update)
    straight = init(jax.random.key(0))
    for i in range(4):
        straight, _ = update(straight, jax.random.key(i))
    state = init(jax.random.key(0))
    for i in range(2):
        state, _ = update(state, jax.random.key(i))
    assert float(state.obs_stats.count) > 2 * 16 * 4 and float(state.return_stats.var) != 1.0
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, state)
    resumed, _, _ = ckpt.restore(init(jax.random.key(99)))
    ckpt.close()
    for i in range(2, 4):
        resumed, _ = update(resumed, jax.random.key(i))
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_target_kl_skips_the_rest_of_the_update():
    """A huge learning rate moves the policy far in one step: the next minibatch's KL is over
    target_kl, so it and every later epoch's minibatches are skipped."""
    cfg = PPOConfig(num_envs=16, rollout_steps=8, epochs=4, minibatches=4, lr=1.0,
                    anneal_lr=False, target_kl=0.01)
    stopping = PPO(MaskedBandit(), None, lambda k: ActorCritic(3, 5, rngs=nnx.Rngs(k)), cfg, 1)
    state = jax.jit(stopping.init)(jax.random.key(0))
    stopped, metrics = jax.jit(stopping.update)(state, jax.random.key(1))
    assert 1 <= float(metrics["minibatches_done"]) < 4  # stopped within the first epoch
    assert float(metrics["approx_kl"]) > 0.01
    # Exactly as many optimizer steps were applied as reported.
    assert int(stopped.opt_state[1][0].count) == int(metrics["minibatches_done"])


def test_noise_drawn_ahead_samples_what_a_key_samples():
    """The rollout draws every step's action noise before its scan (`dist.noise` on an abstract
    distribution); a sample from that noise is the draw `jax.random.categorical` / `normal` make."""
    key = jax.random.key(7)
    logits = jax.random.normal(jax.random.key(1), (64, 5))
    abstract = jax.eval_shape(lambda: Categorical(logits))
    drawn = Categorical(logits).sample_from(abstract.noise(key))
    assert np.array_equal(drawn, jax.random.categorical(key, logits))
    mean, log_std = jnp.ones((64, 2)), jnp.full(2, -1.0)
    want = mean + jnp.exp(log_std) * jax.random.normal(key, (64, 2))
    np.testing.assert_array_equal(Gaussian(mean, log_std).sample(key), want)
