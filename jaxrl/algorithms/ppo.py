"""Proximal Policy Optimization for any gymnax-style env, one jitted pure update per call.

PureJaxRL-shaped (rollout `lax.scan` -> GAE -> minibatch epochs, all inside one function that
`jax.jit` and `jax.vmap` over seeds accept), with the details PureJaxRL skips done right:

- GAE bootstraps through truncation (time limit) but not termination. The env reports the two
  separately and returns the pre-reset observation in `info["final_observation"]`; the value of
  that observation is the bootstrap target, never the value of the next episode's first obs.
- Action masks from `env.action_mask(state, params)` (when the env has one) shape both the
  sampled actions and the training logits.
- Everything that carries across updates (params, optimizer state incl. the learning-rate
  schedule count, env state, last observation, episode statistics, normalisation statistics)
  lives in `PPOState`, so a checkpoint taken between updates resumes the exact run.

And what CleanRL users expect: a categorical policy for discrete actions, a Gaussian one
(state-independent log-std, samples clipped to the bounds only on their way to the env) for
Box actions; optional observation and reward normalisation with running statistics (rewards
divided by the running std of the discounted return, as gym's NormalizeReward / SB3's
VecNormalize do); `target_kl` early stopping; explained variance in the metrics.

The env contract: `reset(key, params) -> (obs, state)`,
`step(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)` with
auto-reset, plus `num_actions`, `observation_shape` and optionally `action_spec`
(`jaxrl.envs.ActionSpec`; without it, `num_actions` categories).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrl.core.config import ConfigError
from jaxrl.core.mesh import batch_sharding, replicated
from jaxrl.core.step import strong_types
from jaxrl.envs import ActionSpec, action_spec
from jaxrl.envs.rollout import play_episodes

# Normalised observations and rewards are clipped to +-NORM_CLIP (CleanRL, SB3 VecNormalize).
NORM_CLIP = 10.0
NORM_EPS = 1e-8


@dataclasses.dataclass
class PPOConfig:
    """PPO hyper-parameters. One update consumes num_envs * rollout_steps env steps."""

    num_envs: int = 64
    rollout_steps: int = 128
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    clip_value: bool = True  # clip the value update to +-clip_eps around the rollout's value
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    lr: float = 2.5e-4
    anneal_lr: bool = True  # linear decay to 0 over the run's updates
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    # Multiplies rewards for learning only (logged returns stay in env units). Keeps value
    # targets near unit scale so the value gradient does not eat the global-norm clip budget.
    reward_scale: float = 1.0
    # Running mean/var normalisation (statistics live in PPOState, so resume is exact).
    normalize_observations: bool = False
    normalize_rewards: bool = False  # divide by the running std of the discounted return
    # Stop the update's remaining minibatch steps once a minibatch's approx KL (old policy vs
    # the current params, measured before its step) exceeds this; None: never stop.
    target_kl: float | None = None
    # Constrained PPO (rlpyt's CPPO-PID): the env reports a cost per step in info["cost"], the
    # model's value head has two outputs (reward, cost), the two streams get their own GAE
    # and (separately) normalised advantages, and the policy loss is the sum-normalised
    # Lagrangian [L_R + lambda L_C] / (1 + lambda) with lambda = PPOState.penalty, which the
    # caller sets between updates (e.g. `algorithms.pid_lagrangian`).
    lagrangian: bool = False
    cost_scale: float = 1.0  # multiplies costs for learning only (metrics stay in env units)

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.rollout_steps

    def validate(self):
        for name in ("num_envs", "rollout_steps", "epochs", "minibatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.minibatches:
            raise ConfigError(
                f"ppo.minibatches={self.minibatches} must divide num_envs * rollout_steps = "
                f"{self.batch_size}; pick a divisor such as {_divisor_near(self.batch_size, self.minibatches)}.")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}.")
        for name in ("clip_eps", "lr", "max_grad_norm", "reward_scale", "cost_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ppo.{name} must be > 0, got {getattr(self, name)}.")
        for name in ("vf_coef", "ent_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ppo.{name} must be >= 0, got {getattr(self, name)}.")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"ppo.target_kl must be > 0 or null, got {self.target_kl}.")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


class RunningStats(struct.PyTreeNode):
    """Running mean and variance (Chan et al.'s parallel update, count started at 1e-4 as in
    CleanRL / SB3's RunningMeanStd)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def zeros(cls, shape=()) -> RunningStats:
        return cls(mean=jnp.zeros(shape), var=jnp.ones(shape), count=jnp.full((), 1e-4, jnp.float32))

    def update(self, batch: jax.Array) -> RunningStats:
        """Fold in `batch` ([N, *shape]) as N samples."""
        n = batch.shape[0]
        mean, var = jnp.mean(batch, 0), jnp.var(batch, 0)
        delta, total = mean - self.mean, self.count + n
        m2 = self.var * self.count + var * n + jnp.square(delta) * self.count * n / total
        return RunningStats(mean=self.mean + delta * n / total, var=m2 / total, count=total)

    def normalize(self, x: jax.Array) -> jax.Array:
        return jnp.clip((x - self.mean) / jnp.sqrt(self.var + NORM_EPS), -NORM_CLIP, NORM_CLIP)


class PPOState(struct.PyTreeNode):
    """Everything one update reads and writes: checkpoint this to resume mid-training."""

    params: Any  # nnx.State of the actor-critic
    opt_state: Any
    env_state: Any  # batched over num_envs
    obs: jax.Array  # [num_envs, obs_dim] observation the next action is taken from
    action_mask: jax.Array | None  # [num_envs, num_actions] or None if the env has no mask
    episode_return: jax.Array  # [num_envs] return so far of the running episode
    episode_length: jax.Array  # [num_envs]
    last_episode_return: jax.Array  # [num_envs] return of each env's last finished episode
    last_episode_length: jax.Array
    update: jax.Array  # number of updates done
    obs_stats: RunningStats | None = None  # [obs_dim] statistics of raw observations
    return_stats: RunningStats | None = None  # [] statistics of the discounted return
    discounted_return: jax.Array | None = None  # [num_envs] running discounted reward sum
    penalty: jax.Array | None = None  # [] lambda of the Lagrangian loss (lagrangian only)


class Transition(struct.PyTreeNode):
    obs: jax.Array  # as the policy saw it (normalised when normalize_observations)
    action_mask: jax.Array | None
    action: jax.Array  # discrete: [..] int; continuous: [.., d] unclipped sample
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array  # env units
    learn_reward: jax.Array  # what GAE sees: normalised and / or scaled
    terminated: jax.Array
    done: jax.Array  # terminated | truncated: the episode (and the GAE trace) ends here
    final_obs: jax.Array  # true successor observation (pre-reset when done), normalised as obs
    cost: jax.Array | None = None  # lagrangian: env units
    cost_value: jax.Array | None = None  # lagrangian: V_C(obs)
    penalty: jax.Array | None = None  # lagrangian: lambda of this update, per sample


def gae(rewards, values, next_values, terminated, done, *, gamma: float, lam: float):
    """Generalized advantage estimation over time-major [T, ...] arrays.

    `next_values[t]` is V of the true successor of step t (the pre-reset observation when the
    episode ended). A terminated step bootstraps nothing; a truncated one bootstraps
    `next_values[t]`; both cut the trace so advantages never leak across episodes.
    Returns (advantages, value targets).
    """
    not_terminated = 1.0 - terminated.astype(values.dtype)
    not_done = 1.0 - done.astype(values.dtype)
    deltas = rewards + gamma * not_terminated * next_values - values

    def backward(next_advantage, step):
        delta, continues = step
        advantage = delta + gamma * lam * continues * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]), (deltas, not_done),
                                 reverse=True)
    return advantages, advantages + values


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_eps: float):
    """PPO's pessimistic surrogate: -mean(min(r A, clip(r, 1-eps, 1+eps) A))."""
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -jnp.mean(jnp.minimum(unclipped, clipped))


def value_loss(value, old_value, targets, clip_eps: float | None):
    """0.5 * squared error; with clip_eps, the pessimistic max over the clipped update."""
    loss = jnp.square(value - targets)
    if clip_eps is not None:
        clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
        loss = jnp.maximum(loss, jnp.square(clipped - targets))
    return 0.5 * jnp.mean(loss)


def explained_variance(values: jax.Array, targets: jax.Array) -> jax.Array:
    """1 - Var(targets - values) / Var(targets): 1 is a perfect critic, 0 no better than a
    constant, negative worse; 0 when the targets do not vary (undefined there)."""
    var = jnp.var(targets)
    return jnp.where(var > 0, 1.0 - jnp.var(targets - values) / jnp.where(var > 0, var, 1.0), 0.0)


def make_optimizer(cfg: PPOConfig, num_updates: int) -> optax.GradientTransformation:
    """Adam (eps 1e-5) with global-norm clipping; lr decays linearly to 0 over the run."""
    lr = cfg.lr
    if cfg.anneal_lr:
        lr = optax.linear_schedule(cfg.lr, 0.0, num_updates * cfg.epochs * cfg.minibatches)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=1e-5))


@dataclasses.dataclass(frozen=True)
class PPO:
    """PPO bound to an env and a model. `init(key)` and `update(state, key)` are pure.

    `make_model(key)` builds the actor-critic (`model(obs, action_mask) -> (dist, value)` with
    `dist` a `Categorical` or `Gaussian` from `jaxrl.models.policy`, and `model.value(obs)`);
    only its graphdef is kept here, params travel in `PPOState`.
    """

    env: Any
    env_params: Any
    make_model: Callable[[jax.Array], nnx.Module]
    cfg: PPOConfig
    num_updates: int  # length of the run, for the learning-rate schedule

    @functools.cached_property
    def graphdef(self):
        return nnx.split(nnx.eval_shape(lambda: self.make_model(jax.random.key(0))))[0]

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        return make_optimizer(self.cfg, self.num_updates)

    @property
    def has_action_mask(self) -> bool:
        return hasattr(self.env, "action_mask")

    @functools.cached_property
    def action_spec(self) -> ActionSpec:
        return action_spec(self.env)

    def env_action(self, action: jax.Array) -> jax.Array:
        """What the env is sent: a Gaussian sample clipped to the bounds, in the space's shape."""
        spec = self.action_spec
        if not spec.continuous:
            return action
        clipped = jnp.clip(action, jnp.asarray(spec.low), jnp.asarray(spec.high))
        return clipped.reshape(*action.shape[:-1], *spec.shape)

    def normalize_obs(self, obs: jax.Array, obs_stats: RunningStats | None) -> jax.Array:
        if not self.cfg.normalize_observations:
            return obs
        if obs_stats is None:
            raise ValueError("ppo.normalize_observations is on: pass the state's obs_stats so "
                             "the policy sees observations normalised as in training.")
        return obs_stats.normalize(obs)

    @property
    def env_steps_per_update(self) -> int:
        return self.cfg.batch_size

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, copy=True)

    def _mask(self, env_state):
        if not self.has_action_mask:
            return None
        return jax.vmap(self.env.action_mask, in_axes=(0, None))(env_state, self.env_params)

    def state_shardings(self, state: PPOState, mesh) -> PPOState:
        """Envs (their states, observations, masks, episode counters) split over the mesh's
        batch axes; params, optimizer state and counters replicated. Under `jit` the rollout
        then steps each device's own envs and the loss's batch mean all-reduces gradients."""
        envs, whole = batch_sharding(mesh, 1), replicated(mesh)
        per_env = lambda tree: jax.tree.map(lambda _: envs, tree)  # noqa: E731
        everywhere = lambda tree: jax.tree.map(lambda _: whole, tree)  # noqa: E731
        return state.replace(
            params=everywhere(state.params), opt_state=everywhere(state.opt_state),
            env_state=per_env(state.env_state), obs=envs, action_mask=per_env(state.action_mask),
            episode_return=envs, episode_length=envs, last_episode_return=envs,
            last_episode_length=envs, update=whole, obs_stats=everywhere(state.obs_stats),
            return_stats=everywhere(state.return_stats),
            discounted_return=per_env(state.discounted_return),
            penalty=everywhere(state.penalty))

    def init(self, key: jax.Array) -> PPOState:
        model_key, env_key = jax.random.split(key)
        params = nnx.split(self.make_model(model_key))[1]
        env_keys = jax.random.split(env_key, self.cfg.num_envs)
        obs, env_state = jax.vmap(self.env.reset, in_axes=(0, None))(env_keys, self.env_params)
        obs = _flat(obs, self.cfg.num_envs)
        zeros = jnp.zeros(self.cfg.num_envs, jnp.float32)
        normalize_rewards = self.cfg.normalize_rewards
        return strong_types(PPOState(  # env resets may be weakly typed (gymnax's Pendulum)
            params=params,
            opt_state=self.tx.init(params),
            env_state=env_state,
            obs=obs,
            action_mask=self._mask(env_state),
            episode_return=zeros,
            episode_length=zeros.astype(jnp.int32),
            last_episode_return=zeros,
            last_episode_length=zeros.astype(jnp.int32),
            update=jnp.zeros((), jnp.int32),
            obs_stats=(RunningStats.zeros(obs.shape[1:]).update(obs)
                       if self.cfg.normalize_observations else None),
            return_stats=RunningStats.zeros() if normalize_rewards else None,
            discounted_return=zeros if normalize_rewards else None,
            penalty=jnp.zeros((), jnp.float32) if self.cfg.lagrangian else None,
        ))

    def rollout(self, state: PPOState, key: jax.Array) -> tuple[PPOState, Transition]:
        """Step all envs rollout_steps times with the current policy (time-major output).

        Observation statistics take in each new observation as it arrives (state.obs is raw,
        already counted); return statistics each step's discounted return, reset where an
        episode ends."""
        cfg, model = self.cfg, self.model(state.params)
        n = cfg.num_envs
        # Every key and the action noise of all steps drawn before the scan, in one batched
        # call each: on CPU each threefry call in the body is a small while loop of its own,
        # and three of them per step cost more than the policy's forward. The draws are the
        # ones a per-step split would make (the same keys, `dist.sample(k)`'s noise).
        action_keys, env_keys = jax.vmap(jax.random.split, out_axes=1)(
            jax.random.split(key, cfg.rollout_steps))
        env_keys = jax.vmap(lambda k: jax.random.split(k, n))(env_keys)
        dist_shape = jax.eval_shape(model, state.obs, state.action_mask)[0]
        noises = jax.vmap(dist_shape.noise)(action_keys)

        def step(state: PPOState, xs):
            noise, step_keys = xs  # this step's action noise [n, ...] and env keys [n]
            obs = self.normalize_obs(state.obs, state.obs_stats)
            dist, value = model(obs, state.action_mask)
            cost_value = None
            if cfg.lagrangian:
                value, cost_value = value[..., 0], value[..., 1]
            action = dist.sample_from(noise)
            log_prob = dist.log_prob(action)
            next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
                self.env.step, in_axes=(0, 0, 0, None))(
                    step_keys, state.env_state, self.env_action(action), self.env_params)
            if "final_observation" not in info:
                raise ValueError(
                    f"{self.env!r}.step must return info['final_observation'] (the pre-reset "
                    "observation) so PPO can bootstrap the value through truncation.")
            done = terminated | truncated
            next_obs, final_obs = _flat(next_obs, n), _flat(info["final_observation"], n)
            obs_stats = state.obs_stats
            if cfg.normalize_observations:
                obs_stats = obs_stats.update(next_obs)
            learn_reward, return_stats, discounted = reward, state.return_stats, None
            if cfg.normalize_rewards:
                discounted = state.discounted_return * cfg.gamma + reward
                return_stats = return_stats.update(discounted)
                learn_reward = jnp.clip(reward / jnp.sqrt(return_stats.var + NORM_EPS),
                                        -NORM_CLIP, NORM_CLIP)
                discounted = jnp.where(done, 0.0, discounted)
            episode_return = state.episode_return + reward
            episode_length = state.episode_length + 1
            transition = Transition(
                obs=obs, action_mask=state.action_mask, action=action, log_prob=log_prob,
                value=value, reward=reward, learn_reward=learn_reward * cfg.reward_scale,
                terminated=terminated, done=done,
                final_obs=self.normalize_obs(final_obs, obs_stats),
                cost=info["cost"] if cfg.lagrangian else None, cost_value=cost_value)
            state = state.replace(
                env_state=env_state,
                obs=next_obs,
                obs_stats=obs_stats,
                return_stats=return_stats,
                discounted_return=discounted,
                action_mask=self._mask(env_state),
                episode_return=jnp.where(done, 0.0, episode_return),
                episode_length=jnp.where(done, 0, episode_length),
                last_episode_return=jnp.where(done, episode_return, state.last_episode_return),
                last_episode_length=jnp.where(done, episode_length, state.last_episode_length),
            )
            return state, transition

        return jax.lax.scan(step, state, (noises, env_keys))

    def loss(self, params, batch: Transition, advantages, targets):
        cfg = self.cfg
        dist, value = self.model(params)(batch.obs, batch.action_mask)
        log_prob = dist.log_prob(batch.action)
        normalize = lambda a: (a - a.mean()) / (a.std() + 1e-8)  # noqa: E731
        v_clip = cfg.clip_eps if cfg.clip_value else None
        if cfg.lagrangian:  # advantages / targets / value: [..., 2] = (reward, cost)
            adv_r, adv_c = advantages[..., 0], advantages[..., 1]
            if cfg.normalize_advantages:  # each stream on its own, never the combination
                adv_r, adv_c = normalize(adv_r), normalize(adv_c)
            penalty = jnp.mean(batch.penalty)  # one lambda per update, carried per sample
            reward_loss = clipped_policy_loss(log_prob, batch.log_prob, adv_r, cfg.clip_eps)
            # pessimistic in cost: mean(max(r A_C, clip(r) A_C))
            cost_loss = clipped_policy_loss(log_prob, batch.log_prob, -adv_c, cfg.clip_eps)
            policy_loss = (reward_loss + penalty * cost_loss) / (1.0 + penalty)
            v_loss = (value_loss(value[..., 0], batch.value, targets[..., 0], v_clip)
                      + value_loss(value[..., 1], batch.cost_value, targets[..., 1], v_clip))
        else:
            if cfg.normalize_advantages:
                advantages = normalize(advantages)
            policy_loss = clipped_policy_loss(log_prob, batch.log_prob, advantages, cfg.clip_eps)
            v_loss = value_loss(value, batch.value, targets, v_clip)
        entropy = jnp.mean(dist.entropy())
        total = policy_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
        log_ratio = log_prob - batch.log_prob
        return total, {
            "loss": total,
            "policy_loss": policy_loss,
            "value_loss": v_loss,
            "entropy": entropy,
            # http://joschu.net/blog/kl-approx.html: unbiased, low-variance KL(old || new)
            "approx_kl": jnp.mean(jnp.expm1(log_ratio) - log_ratio),
            "clip_fraction": jnp.mean(jnp.abs(jnp.exp(log_ratio) - 1.0) > cfg.clip_eps),
        }

    def update(self, state: PPOState, key: jax.Array) -> tuple[PPOState, dict[str, jax.Array]]:
        """One PPO iteration: rollout, GAE, `epochs` passes of `minibatches` gradient steps
        (fewer when `target_kl` stops them; `minibatches_done` counts the steps taken)."""
        cfg = self.cfg
        rollout_key, shuffle_key = jax.random.split(key)
        state, traj = self.rollout(state, rollout_key)

        # V of each step's true successor: the pre-reset observation where an episode ended.
        next_values = self.model(state.params).value(traj.final_obs)
        gae_of = functools.partial(gae, terminated=traj.terminated, done=traj.done,
                                   gamma=cfg.gamma, lam=cfg.gae_lambda)
        if cfg.lagrangian:
            adv_r, targets_r = gae_of(traj.learn_reward, traj.value, next_values[..., 0])
            adv_c, targets_c = gae_of(traj.cost * cfg.cost_scale, traj.cost_value,
                                      next_values[..., 1])
            advantages = jnp.stack([adv_r, adv_c], -1)
            targets = jnp.stack([targets_r, targets_c], -1)
        else:
            advantages, targets = gae_of(traj.learn_reward, traj.value, next_values)

        # The loss reads obs, mask, action, log_prob and value; drop the rest before shuffling.
        batch = traj.replace(reward=None, learn_reward=None, terminated=None, done=None,
                             final_obs=None, cost=None)
        if cfg.lagrangian:  # lambda rides along in each minibatch as a per-sample constant
            batch = batch.replace(penalty=jnp.broadcast_to(state.penalty, traj.value.shape))
        flat = lambda x: x.reshape(cfg.batch_size, *x.shape[2:])  # noqa: E731
        samples = jax.tree.map(flat, (batch, advantages, targets))
        grad_fn = jax.grad(self.loss, has_aux=True)
        tx = self.tx

        def sgd_step(params, opt_state, minibatch):
            grads, metrics = grad_fn(params, *minibatch)
            metrics["grad_norm"] = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, metrics

        def minibatch_step(carry, minibatch):
            """carry: (params, opt_state, stopped); per step: metrics, evaluated, applied."""
            params, opt_state, stopped = carry
            if cfg.target_kl is None:
                params, opt_state, metrics = sgd_step(params, opt_state, minibatch)
                one = jnp.float32(1.0)
                return (params, opt_state, stopped), (metrics, one, one)

            def run(_):
                new_params, new_opt_state, metrics = sgd_step(params, opt_state, minibatch)
                # SB3's order: a minibatch whose pre-step KL is over the target is not applied.
                over = metrics["approx_kl"] > cfg.target_kl
                keep = lambda new, old: jax.tree.map(  # noqa: E731
                    lambda a, b: jnp.where(over, b, a), new, old)
                return (keep(new_params, params), keep(new_opt_state, opt_state), over,
                        (metrics, jnp.float32(1.0), 1.0 - over.astype(jnp.float32)))

            def skip(_):
                shapes = jax.eval_shape(sgd_step, params, opt_state, minibatch)[2]
                zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), shapes)
                return params, opt_state, stopped, (zeros, jnp.float32(0.0), jnp.float32(0.0))

            *carry, out = jax.lax.cond(stopped, skip, run, None)
            return tuple(carry), out

        def epoch(carry, key):
            # One sort of random 32-bit keys. `jax.random.permutation` sorts twice at these
            # sizes to make key collisions negligible; here a collision only keeps two samples
            # in index order, and XLA:CPU's sorts were ~10% of a Prospector update.
            order = jnp.argsort(jax.random.bits(key, (cfg.batch_size,)))
            minibatches = jax.tree.map(
                lambda x: x[order].reshape(cfg.minibatches, -1, *x.shape[1:]), samples)
            return jax.lax.scan(minibatch_step, carry, minibatches)

        (params, opt_state, _), (metrics, evaluated, applied) = jax.lax.scan(
            epoch, (state.params, state.opt_state, jnp.bool_(False)),
            jax.random.split(shuffle_key, cfg.epochs))
        # Means over the minibatches whose loss was evaluated (all of them without target_kl).
        weights = jnp.broadcast_to(evaluated, (cfg.epochs, cfg.minibatches))
        metrics = jax.tree.map(lambda m: jnp.sum(m * weights) / jnp.sum(weights), metrics)
        if cfg.lagrangian:
            metrics.update(cost_per_step=jnp.mean(traj.cost), penalty=state.penalty)
        metrics.update(
            episode_return=jnp.mean(state.last_episode_return),
            episode_length=jnp.mean(state.last_episode_length.astype(jnp.float32)),
            episodes_finished=jnp.sum(traj.done),
            reward_per_step=jnp.mean(traj.reward),
            value_mean=jnp.mean(traj.value),  # in learn_reward units
            explained_variance=explained_variance(
                traj.value, targets[..., 0] if cfg.lagrangian else targets),
            minibatches_done=jnp.sum(jnp.broadcast_to(applied, weights.shape)),
        )
        state = state.replace(params=params, opt_state=opt_state, update=state.update + 1)
        return state, metrics

    def act(self, params, key: jax.Array, obs: jax.Array, action_mask=None, *,
            obs_stats: RunningStats | None = None, greedy: bool = True) -> jax.Array:
        """Env actions for a batch of raw observations: the mode (greedy) or a sample.

        With normalize_observations, pass the training state's `obs_stats`."""
        obs = self.normalize_obs(_flat(obs, obs.shape[0]), obs_stats)
        dist, _ = self.model(params)(obs, action_mask)
        return self.env_action(dist.mode() if greedy else dist.sample(key))


def evaluate(env, env_params, act: Callable, reset_keys: jax.Array, key: jax.Array, *,
             max_steps: int) -> jax.Array:
    """Return of one episode per reset key (all played side by side) under `act`.

    `act(key, obs[N, ...], action_mask[N, A] | None) -> actions[N]`. Passing the same
    `reset_keys` to two policies makes them face the same episodes. Episodes still running
    after `max_steps` are cut there (choose it >= the env's time limit).
    """
    return play_episodes(env, env_params, act, reset_keys, jax.random.split(key, max_steps))[0]


def _flat(obs: jax.Array, n: int) -> jax.Array:
    return obs.reshape(n, -1).astype(jnp.float32)

