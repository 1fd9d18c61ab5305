"""Chunk-level test-time training as an MDP: before each chunk, SKIP or UPDATE_k on the last one.

A document is cut into chunks X_0 .. X_{T-1} of C tokens. Chunk t is scored with X_{t-1} as
its context (chunk 0 with one `<|endoftext|>`), the loss over X_t's real targets only
(`<|pad|>` targets are masked). Causal order, "apply then update": the decision before chunk
t may take k in {0, 1, 2, 4} inner steps on X_{t-1} (with X_{t-2} as context), then chunk t is
scored with the result, so chunk t is always predicted by weights that saw only chunks < t,
and no reward is ever measured on the chunk the update trained on. Decision 0 is forced to
SKIP (there is nothing to update on), so episodes start at t = 1.

Reward (`reward_mode`): `anchored` r_t = l0_t - l_t(phi_t), with l0 the unadapted loss
(cached per document), so the return is exactly the document's total loss reduction;
`counterfactual` r_t = l_t(phi_{t-1}) - l_t(phi_t) (one extra scoring). The cost stream is
separate: c_t = rho * K[a_t] extra forward-equivalents, never mixed into the reward here.

Observations (21 floats) read only chunks < t (see `FEATURES`). One step function
(`advance`) serves PPO training (`ChunkTTTEnv`, gymnax-style with auto-reset) and the
evaluation rollouts (`rollout`: one `lax.scan` over chunks, vmapped over documents;
`rollout_adapted` also returns the adapted fast weights, for sampling completions).

Known limit: under `vmap` a batched `while_loop` runs the batch's largest k for every
document, so wall-clock follows the batch maximum; every method is still charged its own cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl.models.fast_weights import FastLM

STEPS = (0, 1, 2, 4)  # inner steps of SKIP, U1, U2, U4
ACTIONS = ("SKIP", "U1", "U2", "U4")
FEATURES = (
    "loss", "loss0", "gain", "ema_mean", "ema_std", "surprise", "loss_delta", "entropy",
    "neg_log_max", "grad_proxy", "log_inner_grad", "prev_skip", "prev_u1", "prev_u2", "prev_u4",
    "since_update", "budget_slack", "cost_rate", "t_frac", "log_t_frac", "first",
)
EMA_ALPHA = 0.3


class DocumentError(ValueError):
    """A document or budget the protocol cannot use; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Documents: host-side chunking, then the cached per-chunk arrays every rollout reads


def chunk_tokens(docs: Sequence[Sequence[int]], *, chunk: int, max_chunks: int, eot_id: int,
                 pad_id: int, names: Sequence[str] | None = None):
    """Token lists -> (windows [N, T, 2C], targets [N, T, C], lengths [N], cut [N]) as numpy.

    Window t is [X_{t-1}; X_t] (chunk 0: pads then one EOT as context); targets are X_t, pad
    past the document's end. A document is cut at `max_chunks` (`cut` marks it: its last
    value is bootstrapped, not terminal). Fewer than two chunks is an error: there would be
    no decision to make."""
    n, T = len(docs), max_chunks
    windows = np.full((n, T, 2 * chunk), pad_id, np.int32)
    targets = np.full((n, T, chunk), pad_id, np.int32)
    lengths = np.zeros(n, np.int32)
    cut = np.zeros(n, bool)
    for i, ids in enumerate(docs):
        count = -(-len(ids) // chunk)
        if len(ids) <= chunk:
            name = names[i] if names else f"document {i}"
            raise DocumentError(
                f"{name} has {len(ids)} tokens, fewer than two chunks of {chunk}: there is no "
                f"chunk to adapt on before the next one. Drop it (data.drop_short=true), or "
                f"lower chunk below {max(len(ids) // 2, 1)}.")
        ids = np.asarray(ids[:T * chunk], np.int32)
        lengths[i], cut[i] = min(count, T), count > T
        padded = np.full(T * chunk, pad_id, np.int32)
        padded[:len(ids)] = ids
        targets[i] = padded.reshape(T, chunk)
        context = np.concatenate([np.full(chunk - 1, pad_id, np.int32), [eot_id], padded[:-chunk]])
        windows[i] = np.concatenate([context.reshape(T, chunk), targets[i]], -1)
    return windows, targets, lengths, cut


@struct.dataclass
class Docs:
    """Everything a rollout reads, per document [N, T, ...]; built once, reused by every method."""

    inputs: jax.Array  # [N, T, C, d] trunk states (top) or [N, T, 2C] tokens (lora)
    targets: jax.Array  # [N, T, C]
    mask: jax.Array  # [N, T, C] float: real targets
    loss0: jax.Array  # [N, T] CE under the start weights
    aux0: dict  # [N, T] entropy / neg_log_max / grad_proxy under the start weights
    valid: jax.Array  # [N, T] bool: chunk t exists
    cut: jax.Array  # [N] bool: the document went on past T chunks
    # The start weights every document resets to. They ride here, as an argument of every
    # jitted rollout: closed over as constants they gave NaN logits in jaxlib 0.10.2's YNNPACK
    # fusions (8 of 10 compiles with the fusions on, 0 of 10 off; see docs/chunk_ttt.md).
    fast0: Any

    @property
    def num_chunks(self) -> int:
        return self.targets.shape[1]


def make_docs(lm: FastLM, inputs, targets, lengths, cut, pad_id: int, batch: int = 64) -> Docs:
    """Cache the start weights' loss and signals of every chunk (one jitted map over chunks)."""
    targets = jnp.asarray(targets)
    mask = (targets != pad_id).astype(jnp.float32)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    score = jax.jit(jax.vmap(lm.score, in_axes=(None, 0, 0, 0)))
    n = flat(targets).shape[0]
    outs = [score(lm.fast0, flat(inputs)[s:s + batch], flat(targets)[s:s + batch],
                  flat(mask)[s:s + batch]) for s in range(0, n, batch)]
    loss0 = jnp.concatenate([o[0] for o in outs]).reshape(targets.shape[:2])
    aux0 = {k: jnp.concatenate([o[1][k] for o in outs]).reshape(targets.shape[:2]) for k in outs[0][1]}
    valid = jnp.arange(targets.shape[1])[None] < jnp.asarray(lengths)[:, None]
    return Docs(inputs=jnp.asarray(inputs), targets=targets, mask=mask, loss0=loss0, aux0=aux0,
                valid=valid, cut=jnp.asarray(cut), fast0=lm.fast0)


def take(docs: Docs, doc, t):
    """Chunk t of document `doc`: (inputs, targets, mask, loss0)."""
    return docs.inputs[doc, t], docs.targets[doc, t], docs.mask[doc, t], docs.loss0[doc, t]


# ---------------------------------------------------------------------------------------------
# Features and the step


@struct.dataclass
class Features:
    """Running statistics of the chunks scored so far (all from chunks < the next one)."""

    loss: jax.Array  # l_{t-1} under phi_{t-1}
    loss0: jax.Array
    prev_loss: jax.Array  # l_{t-2}
    mean: jax.Array  # EMA over l up to t-1
    var: jax.Array
    surprise: jax.Array  # (l_{t-1} - mean_{t-2}) / (std_{t-2} + 1e-3)
    entropy: jax.Array
    neg_log_max: jax.Array
    grad_proxy: jax.Array
    inner_grad: jax.Array  # ||g|| of the last real inner step; 0 before any
    prev_action: jax.Array
    since_update: jax.Array
    cost_sum: jax.Array  # sum of c~ over decisions so far


@struct.dataclass
class ChunkState:
    """One document being read: where, the fast weights, their optimiser, the features."""

    doc: jax.Array
    t: jax.Array  # the next chunk to score (the next decision is before it)
    fast: Any
    opt: Any
    feats: Features


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ChunkTTT:
    """The protocol bound to a model, a cost model and a budget (all static)."""

    lm: FastLM
    rho: float  # extra forward-equivalents of one inner step
    budget: float  # B: target mean c~ per decision
    reward_mode: str = "anchored"  # or "counterfactual"

    @property
    def costs(self) -> tuple[float, ...]:
        return tuple(self.rho * k for k in STEPS)

    def start(self, docs: Docs, doc) -> ChunkState:
        """phi_0, a fresh optimiser, features of chunk 0 (scored with phi_0: the forced SKIP)."""
        l0 = docs.loss0[doc, 0]
        z = jnp.zeros((), jnp.float32)
        feats = Features(loss=l0, loss0=l0, prev_loss=l0, mean=l0, var=z, surprise=z,
                         entropy=docs.aux0["entropy"][doc, 0],
                         neg_log_max=docs.aux0["neg_log_max"][doc, 0],
                         grad_proxy=docs.aux0["grad_proxy"][doc, 0], inner_grad=z,
                         prev_action=jnp.zeros((), jnp.int32), since_update=z + 1.0, cost_sum=z)
        return ChunkState(doc=jnp.asarray(doc, jnp.int32), t=jnp.ones((), jnp.int32),
                          fast=docs.fast0, opt=self.lm.tx.init(docs.fast0), feats=feats)

    def observe(self, state: ChunkState, num_chunks: int) -> jax.Array:
        """The 21 causal features (FEATURES) of the decision before chunk state.t."""
        f, t = state.feats, state.t.astype(jnp.float32)
        std = jnp.sqrt(f.var)
        decisions = t - 1.0
        return jnp.concatenate([
            jnp.stack([f.loss, f.loss0, f.loss0 - f.loss, f.mean, std, f.surprise,
                       f.loss - f.prev_loss, f.entropy, f.neg_log_max, f.grad_proxy,
                       jnp.log1p(f.inner_grad)]),
            jax.nn.one_hot(f.prev_action, len(STEPS)),
            jnp.stack([jnp.minimum(f.since_update / 8.0, 1.0),
                       (self.budget * decisions - f.cost_sum) / self.budget,
                       f.cost_sum / jnp.maximum(decisions, 1.0) / self.budget,
                       t / num_chunks, jnp.log1p(t) / math.log1p(num_chunks),
                       (t == 1).astype(jnp.float32)]),
        ]).astype(jnp.float32)

    def adapt(self, fast, opt, k, inputs, targets, mask):
        """k inner steps on one chunk (a while_loop: k = 0 costs nothing unbatched)."""
        def body(s):
            i, f, o, _ = s
            f, o, g = self.lm.inner_step(f, o, inputs, targets, mask)
            return i + 1, f, o, g
        _, fast, opt, g = jax.lax.while_loop(lambda s: s[0] < k, body,
                                             (jnp.zeros((), jnp.int32), fast, opt, jnp.zeros(())))
        return fast, opt, g

    def advance(self, docs: Docs, state: ChunkState, action):
        """Take `action` before chunk state.t, score the chunk -> (state, reward, cost, loss)."""
        doc, t = state.doc, state.t
        k = jnp.asarray(STEPS)[action]
        upd_in, upd_y, upd_m, _ = take(docs, doc, t - 1)
        cur_in, cur_y, cur_m, l0 = take(docs, doc, t)
        fast, opt, g = self.adapt(state.fast, state.opt, k, upd_in, upd_y, upd_m)
        loss, aux = self.lm.score(fast, cur_in, cur_y, cur_m)
        if self.reward_mode == "anchored":
            reward = l0 - loss
        else:
            reward = self.lm.loss(state.fast, cur_in, cur_y, cur_m) - loss
        cost = jnp.asarray(self.costs, jnp.float32)[action]
        f = state.feats
        std = jnp.sqrt(f.var)
        mean = EMA_ALPHA * loss + (1 - EMA_ALPHA) * f.mean
        var = (1 - EMA_ALPHA) * (f.var + EMA_ALPHA * jnp.square(loss - f.mean))
        updated = k > 0
        feats = Features(
            loss=loss, loss0=l0, prev_loss=f.loss, mean=mean, var=var,
            surprise=(loss - f.mean) / (std + 1e-3), entropy=aux["entropy"],
            neg_log_max=aux["neg_log_max"], grad_proxy=aux["grad_proxy"],
            inner_grad=jnp.where(updated, g, f.inner_grad), prev_action=jnp.asarray(action, jnp.int32),
            since_update=jnp.where(updated, 1.0, f.since_update + 1.0), cost_sum=f.cost_sum + cost)
        state = ChunkState(doc=doc, t=t + 1, fast=fast, opt=opt, feats=feats)
        return state, reward, cost, loss


# ---------------------------------------------------------------------------------------------
# PPO's view: a gymnax-style env over a pool of documents, auto-resetting to a random one


@struct.dataclass
class EnvParams:
    docs: Docs


class ChunkTTTEnv:
    """`reset` / `step` (gymnax 6-tuple, auto-reset); `info['cost']` is the cost stream."""

    num_actions = len(STEPS)
    observation_shape = (len(FEATURES),)

    def __init__(self, ttt: ChunkTTT, num_chunks: int):
        self.ttt, self.num_chunks = ttt, num_chunks

    def reset(self, key, params: EnvParams):
        doc = jax.random.randint(key, (), 0, params.docs.targets.shape[0])
        state = self.ttt.start(params.docs, doc)
        return self.ttt.observe(state, self.num_chunks), state

    def step(self, key, state: ChunkState, action, params: EnvParams):
        docs = params.docs
        state, reward, cost, _ = self.ttt.advance(docs, state, action)
        obs = self.ttt.observe(state, self.num_chunks)
        end = (state.t >= docs.valid.shape[1]) | ~docs.valid[state.doc, jnp.minimum(state.t, docs.valid.shape[1] - 1)]
        cut = docs.cut[state.doc]
        reset_obs, reset_state = self.reset(key, params)
        state = jax.tree.map(lambda a, b: jnp.where(end, a, b), reset_state, state)
        obs_out = jnp.where(end, reset_obs, obs)
        info = {"final_observation": obs, "cost": cost}
        return obs_out, state, reward.astype(jnp.float32), end & ~cut, end & cut, info

    def __repr__(self):
        return f"ChunkTTTEnv(B={self.ttt.budget}, rho={self.ttt.rho:.3g})"


# ---------------------------------------------------------------------------------------------
# Evaluation: any policy over every document, one scan over chunks vmapped over documents
#
# A policy is a module-level function act(ttt, docs, p, obs [21], state, per_doc, key) ->
# (action, p); its parameters ride in `p` (traced), so one compile serves every setting.


@struct.dataclass
class Trace:
    """Per decision t = 1 .. T-1 of each document: [N, T-1, ...]."""

    action: jax.Array
    loss: jax.Array
    reward: jax.Array
    cost: jax.Array
    valid: jax.Array
    obs: jax.Array  # [N, T-1, 21]


@struct.dataclass
class Reading:
    """The carry of one document's scan over its chunks: where it is, and the policy's state."""

    state: ChunkState
    p: Any


def _read(ttt: ChunkTTT, docs: Docs, act, p0, per_doc, key) -> tuple[Reading, Trace]:
    """The body of both rollouts -> (each document's last carry, its trace)."""
    T = docs.num_chunks

    def one(doc, per, key):
        def step(carry: Reading, t_key):
            t, k = t_key
            obs = ttt.observe(carry.state, T)
            action, p = act(ttt, docs, carry.p, obs, carry.state, per, k)
            valid = docs.valid[doc, t]
            action = jnp.where(valid, action, 0).astype(jnp.int32)
            new, reward, cost, loss = ttt.advance(docs, carry.state, action)
            state = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, carry.state)
            return Reading(state=state, p=p), Trace(action=action, loss=loss, reward=reward * valid,
                                                    cost=cost * valid, valid=valid, obs=obs)
        ts = jnp.arange(1, T)
        start = Reading(state=ttt.start(docs, doc), p=p0)
        return jax.lax.scan(step, start, (ts, jax.random.split(key, T - 1)))

    n = docs.targets.shape[0]
    return jax.vmap(one)(jnp.arange(n), per_doc, jax.random.split(key, n))


@functools.partial(jax.jit, static_argnums=(0, 2))
def rollout(ttt: ChunkTTT, docs: Docs, act, p0, per_doc, key) -> Trace:
    """Run `act` over every document (vmapped) and chunk (scanned); padded steps are inert."""
    return _read(ttt, docs, act, p0, per_doc, key)[1]


@functools.partial(jax.jit, static_argnums=(0, 2))
def rollout_adapted(ttt: ChunkTTT, docs: Docs, act, p0, per_doc, key) -> tuple[Trace, Any]:
    """`rollout`, and each document's fast weights after its last decision ([N, ...] leaves):
    what a completion of the document is sampled with. Its own jit, so `rollout` never
    returns (or keeps) N copies of the fast weights."""
    end, trace = _read(ttt, docs, act, p0, per_doc, key)
    return trace, end.state.fast


def summarize(trace: Trace, docs: Docs, budget: float) -> dict:
    """Token-weighted CE over chunks 1..T-1 (the same tokens for every method), chunk-weighted
    mean cost, per-document adherence."""
    tokens = np.asarray(docs.mask.sum(-1))[:, 1:]
    valid = np.asarray(trace.valid)
    w = tokens * valid
    loss, loss0 = np.asarray(trace.loss), np.asarray(docs.loss0)[:, 1:]
    cost, actions = np.asarray(trace.cost), np.asarray(trace.action)
    doc_cost = cost.sum(1) / np.maximum(valid.sum(1), 1)
    mean_cost = float(cost.sum() / valid.sum())
    return {
        "ce": float((loss * w).sum() / w.sum()),
        "ce_skip": float((loss0 * w).sum() / w.sum()),
        "cost": mean_cost,
        "budget_error": abs(mean_cost - budget) / budget,
        "over_budget_docs": float(np.mean(doc_cost > 1.1 * budget)),
        "action_freq": [round(float(((actions == a) & valid).sum() / valid.sum()), 4)
                        for a in range(len(STEPS))],
    }


# ---------------------------------------------------------------------------------------------
# Baselines: policies on the same features, and oracles that peek at chunk t's targets


def act_constant(ttt, docs, action, obs, state, per, key):
    return action, action


def act_random(ttt, docs, logits, obs, state, per, key):
    """A fixed action distribution (ponderTTT's random skip), p = logits [4]."""
    return jax.random.categorical(key, logits), logits


def act_periodic(ttt, docs, p, obs, state, per, key):
    """p = (every, action): the action on decisions t = every, 2 every, ...; SKIP between."""
    every, action = p
    return jnp.where(state.t % every == 0, action, 0), p


def threshold_gate(feature: str):
    """Update when FEATURES[feature] > tau; tau tracks the target update rate,
    tau <- tau + kappa (1[update] - rate) (ponderTTT's calibrated EMA gate).
    p = (tau, kappa, rate, action); tau starts at the calibrated quantile."""
    return _GATES[feature]


def _gate(index: int):
    def act(ttt, docs, p, obs, state, per, key):
        tau, kappa, rate, action = p
        update = obs[index] > tau
        tau = tau + kappa * (update.astype(jnp.float32) - rate)
        return jnp.where(update, action, 0), (tau, kappa, rate, action)
    return act


_GATES = {name: _gate(FEATURES.index(name)) for name in ("loss", "entropy", "surprise")}


@struct.dataclass
class Calibrated:
    """p of a `cost_calibrated` act: the wrapped policy's parameters and its budget tracker.

    A trained policy's lambda is frozen in its weights, so on documents whose statistics
    differ from training it spends what those weights say, not B. mu is the test-time
    counterpart of the gates' tau: a per-document cost multiplier on the logits."""

    policy: Any  # logits_fn's parameters
    mu: jax.Array  # logit offset per forward-equivalent of cost; < 0 pushes spending up
    kappa: jax.Array  # mu step per unit of relative cost error; 0: the policy as trained
    budget: jax.Array


def cost_calibrated(logits_fn):
    """An act sampling logits_fn(p.policy, obs) - mu c~(a), then mu <- mu + kappa (c~_t - B) / B:
    an integral controller on the realised cost (relative error, as the training PID, so one
    gain serves every B). With kappa = 0 it draws exactly what categorical(key, logits) draws."""
    def act(ttt, docs, p: Calibrated, obs, state, per, key):
        costs = jnp.asarray(ttt.costs, jnp.float32)
        action = jax.random.categorical(key, logits_fn(p.policy, obs) - p.mu * costs)
        return action, p.replace(mu=p.mu + p.kappa * (costs[action] - p.budget) / p.budget)
    return act


act_random_calibrated = cost_calibrated(lambda logits, obs: logits)  # act_random with a tracker


def act_schedule(ttt, docs, p, obs, state, per, key):
    """A fixed per-document plan: per_doc[t - 1] (the top-q oracle's)."""
    return per[state.t - 1], p


def act_greedy_oracle(ttt, docs, penalty, obs, state, per, key):
    """argmax_a [l_t(phi_{t-1}) - l_t(phi_t^a)] - penalty * c~(a): peeks at chunk t. The
    candidates share their first steps (U2 continues U1), so all four cost 4 inner steps."""
    upd_in, upd_y, upd_m, _ = take(docs, state.doc, state.t - 1)
    cur_in, cur_y, cur_m, _ = take(docs, state.doc, state.t)

    def step(carry, _):
        fast, opt = carry
        fast, opt, _ = ttt.lm.inner_step(fast, opt, upd_in, upd_y, upd_m)
        return (fast, opt), ttt.lm.loss(fast, cur_in, cur_y, cur_m)

    _, after = jax.lax.scan(step, (state.fast, state.opt), None, length=STEPS[-1])
    before = ttt.lm.loss(state.fast, cur_in, cur_y, cur_m)
    losses = jnp.stack([before, *(after[k - 1] for k in STEPS[1:])])
    gains = before - losses - penalty * jnp.asarray(ttt.costs, jnp.float32)
    return jnp.argmax(gains).astype(jnp.int32), penalty


@functools.partial(jax.jit, static_argnums=(0, 2))
def independent_gains(ttt: ChunkTTT, docs: Docs, action: int = 1) -> jax.Array:
    """[N, T-1]: l0_t - l_t(Update_k(phi_0; X_{t-1})): each chunk's gain from the start weights."""
    k = STEPS[action]

    def gain(doc, t):
        upd_in, upd_y, upd_m, _ = take(docs, doc, t - 1)
        cur_in, cur_y, cur_m, l0 = take(docs, doc, t)
        fast, _, _ = ttt.adapt(docs.fast0, ttt.lm.tx.init(docs.fast0), k, upd_in, upd_y, upd_m)
        return l0 - ttt.lm.loss(fast, cur_in, cur_y, cur_m)

    n, T = docs.targets.shape[:2]
    docs_ix, ts = jnp.meshgrid(jnp.arange(n), jnp.arange(1, T), indexing="ij")
    return jax.vmap(jax.vmap(gain))(docs_ix, ts)


def top_q_plan(gains, valid, q: float, action: int = 1) -> np.ndarray:
    """Update (with `action`) the top q fraction of valid decisions by independent gain."""
    gains, valid = np.asarray(gains), np.asarray(valid)
    count = int(round(min(max(q, 0.0), 1.0) * valid.sum()))
    order = np.argsort(-np.where(valid, gains, -np.inf), axis=None)[:count]
    plan = np.zeros(gains.shape, np.int32)
    plan.flat[order] = action
    return plan
