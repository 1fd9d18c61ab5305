"""Pure-JAX Prospector core: `reset_core(seed)`, `step_core(state, action)`, `observe(state)`.

Written for ONE environment with integer state; vmap it for a batch. Every operation mirrors
`prospector.cc` line for line (same draw indices, same integer arithmetic, arithmetic shifts,
unsigned modulo), which is what makes the two cores bit-identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl.envs.prospector import spec as S

U32 = jnp.uint32
I32 = jnp.int32


@struct.dataclass
class ProspectorState:
    """Game state of one env (leading batch dims when vmapped). All int32; layout in spec.py."""

    ship: jax.Array  # [16]
    asteroids: jax.Array  # [96] packed: ore | richness << 2 | known << 4 | units << 8
    sectors: jax.Array  # [12] hazard | scanned << 2
    market: jax.Array  # [24] prices then mean prices, index station * 4 + ore


# ---- RNG -------------------------------------------------------------------------------------
def mix32(x):
    """lowbias32 integer hash (Wellons): a bijection on uint32 with good avalanche."""
    x = x ^ (x >> 16)
    x = x * U32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * U32(0x846CA68B)
    return x ^ (x >> 16)


def stream(seed, counter):
    """Per-(env, counter) stream base; `draw(base, i)` then gives the i-th uint32."""
    return mix32(seed + jnp.asarray(counter, U32) * U32(S.GOLDEN))


def draw(base, i):
    return mix32(base ^ (jnp.asarray(i, U32) * U32(S.DRAW_MUL) + U32(S.DRAW_ADD)))


def below(r, n):
    """Uniform-ish int in [0, n) from a uint32 draw (unsigned modulo, as in C++)."""
    return (r % jnp.asarray(n, U32)).astype(I32)


def seed_from_key(key) -> jax.Array:
    """uint32 episode seed from a JAX PRNG key (typed or raw uint32[2])."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = data.astype(U32)
    seed = U32(0)
    for i in range(data.shape[-1]):
        seed = mix32(seed ^ data[..., i])
    return seed


def ring_distance(a, b):
    d = jnp.abs(a - b)
    return jnp.minimum(d, S.N_SECTORS - d)


def warp_fuel(dist):
    return 2 + 2 * dist


def scan_fuel(dist):
    return 1 + (dist >> 1)


# NumPy, not jnp: a module-level jnp array would start a JAX backend at import (before
# `jax.distributed.initialize` could run). Indexed with tracers through `jnp.asarray`.
STATION_OF_SECTOR = np.array(
    [S.STATION_SECTORS.index(k) if k in S.STATION_SECTORS else -1 for k in range(S.N_SECTORS)],
    np.int32)
STATION_SECTORS = np.array(S.STATION_SECTORS, np.int32)
BASE_PRICE = np.array(S.ORE_BASE_PRICE, np.int32)


# ---- reset -----------------------------------------------------------------------------------
def reset_core(seed) -> ProspectorState:
    seed = jnp.asarray(seed, U32)
    base = stream(seed, 0)
    sector_ids = jnp.arange(S.N_SECTORS, dtype=I32)
    is_station = STATION_OF_SECTOR >= 0
    hazard = jnp.where(is_station, 0, below(draw(base, S.R_HAZARD + sector_ids), 4))

    ast_ids = jnp.arange(S.N_SECTORS * S.N_ASTEROIDS, dtype=I32)
    ast_hazard = hazard[ast_ids // S.N_ASTEROIDS]
    k = S.R_ASTEROID + 3 * ast_ids
    u = below(draw(base, k), 100)
    ore = (u >= 40).astype(I32) + (u >= 70) + (u >= 90)
    richness = below(draw(base, k + 1), (3 + (ast_hazard > 0)).astype(U32)) + (ast_hazard >= 2)
    richness = jnp.minimum(richness, 3)
    units = 12 + below(draw(base, k + 2), 25)
    asteroids = ore | (richness << 2) | (units << S.AST_LEFT_SHIFT)

    m = jnp.arange(S.N_STATIONS * S.N_ORES, dtype=I32)
    means = jnp.asarray(BASE_PRICE)[m % S.N_ORES] * (75 + below(draw(base, S.R_MEAN + m), 51)) // 100
    market = jnp.concatenate([means, means])

    ship = jnp.zeros(S.SHIP_WORDS, I32)
    ship = ship.at[S.S_FUEL].set(S.FUEL_MAX).at[S.S_HULL].set(S.HULL_MAX)
    ship = ship.at[S.S_CAP].set(S.CARGO_BASE)
    ship = ship.at[S.S_SEED].set(jax.lax.bitcast_convert_type(seed, I32))
    return ProspectorState(ship=ship, asteroids=asteroids, sectors=hazard, market=market)


# ---- action mask -------------------------------------------------------------------------------
def action_mask(state: ProspectorState) -> jax.Array:
    """bool[69]: which actions have an effect now (others are a no-op with a penalty)."""
    ship = state.ship
    sector, fuel, hull = ship[S.S_SECTOR], ship[S.S_FUEL], ship[S.S_HULL]
    cargo = ship[S.S_CARGO : S.S_CARGO + S.N_ORES]
    free = ship[S.S_CAP] - cargo.sum()
    at_station = jnp.asarray(STATION_OF_SECTOR)[sector] >= 0
    ks = jnp.arange(S.N_SECTORS, dtype=I32)
    dist = ring_distance(sector, ks)
    warp = (ks != sector) & (fuel >= warp_fuel(dist))
    scan = ((state.sectors & S.SEC_SCANNED_BIT) == 0) & (fuel >= scan_fuel(dist))
    here = jax.lax.dynamic_slice(state.asteroids, (sector * S.N_ASTEROIDS,), (S.N_ASTEROIDS,))
    left = here >> S.AST_LEFT_SHIFT
    powers = jnp.arange(S.N_DRILL_POWERS, dtype=I32)
    mine = (left[:, None] > 0) & (free > 0) & (fuel >= powers[None, :] + 1)
    has = cargo > 0
    return jnp.concatenate([
        jnp.ones(1, bool),
        warp,
        scan,
        mine.reshape(-1),
        has & at_station,
        has,
        jnp.stack([
            at_station & has.any(),
            at_station & (fuel < S.FUEL_MAX),
            at_station & (hull < S.HULL_MAX),
            at_station & (ship[S.S_UPGRADES] < S.MAX_UPGRADES)
            & (ship[S.S_CREDITS] >= S.UPGRADE_COST),
        ]),
    ])


# ---- step ------------------------------------------------------------------------------------
def step_core(state: ProspectorState, action, max_steps: int, invalid_penalty: int,
              loss_penalty: int):
    """One transition without auto-reset: (state, reward, terminated, truncated)."""
    ship, asteroids, sectors, market = state.ship, state.asteroids, state.sectors, state.market
    action = jnp.asarray(action, I32)
    in_range = (action >= 0) & (action < S.N_ACTIONS)
    valid = in_range & action_mask(state)[jnp.clip(action, 0, S.N_ACTIONS - 1)]
    act = jnp.where(valid, action, S.A_WAIT)

    t = ship[S.S_T] + 1
    base = stream(jax.lax.bitcast_convert_type(ship[S.S_SEED], U32), t.astype(U32))
    sector, fuel, hull = ship[S.S_SECTOR], ship[S.S_FUEL], ship[S.S_HULL]
    cargo = ship[S.S_CARGO : S.S_CARGO + S.N_ORES]
    prices, means = market[: S.N_STATIONS * S.N_ORES], market[S.N_STATIONS * S.N_ORES :]
    station = jnp.asarray(STATION_OF_SECTOR)[sector]
    st_off = jnp.maximum(station, 0) * S.N_ORES

    # Warp / scan.
    is_warp = (act >= S.A_WARP) & (act < S.A_SCAN)
    is_scan = (act >= S.A_SCAN) & (act < S.A_MINE)
    target = jnp.where(is_warp, act - S.A_WARP, act - S.A_SCAN)
    dist = ring_distance(sector, target)
    fuel = fuel - jnp.where(is_warp, warp_fuel(dist), 0) - jnp.where(is_scan, scan_fuel(dist), 0)
    scan_sector = jnp.where(is_scan, target, -1)
    sectors = jnp.where(jnp.arange(S.N_SECTORS) == scan_sector, sectors | S.SEC_SCANNED_BIT,
                        sectors)
    ast_sector = jnp.arange(S.N_SECTORS * S.N_ASTEROIDS, dtype=I32) // S.N_ASTEROIDS
    asteroids = jnp.where(ast_sector == scan_sector, asteroids | S.AST_KNOWN_BIT, asteroids)

    # Mine.
    is_mine = (act >= S.A_MINE) & (act < S.A_SELL)
    mine_idx = jnp.clip(act - S.A_MINE, 0, S.N_ASTEROIDS * S.N_DRILL_POWERS - 1)
    power = mine_idx % S.N_DRILL_POWERS
    slot = sector * S.N_ASTEROIDS + mine_idx // S.N_DRILL_POWERS
    packed = asteroids[slot]
    ore, richness, left = packed & 3, (packed >> 2) & 3, packed >> S.AST_LEFT_SHIFT
    free = ship[S.S_CAP] - cargo.sum()
    mined = jnp.where(is_mine, jnp.minimum(jnp.minimum(left, free), (power + 1) * richness), 0)
    new_packed = ((packed & 0xFF) | S.AST_KNOWN_BIT) | ((left - mined) << S.AST_LEFT_SHIFT)
    asteroids = asteroids.at[slot].set(jnp.where(is_mine, new_packed, packed))
    cargo = cargo + jnp.where(jnp.arange(S.N_ORES) == ore, mined, 0)
    fuel = fuel - jnp.where(is_mine, power + 1, 0)
    hazard_here = sectors[sector] & 3
    accident = is_mine & (
        (draw(base, S.D_ACCIDENT) & 0xFFFF).astype(I32) < hazard_here * (power + 1) * S.ACCIDENT_P16
    )
    damage = jnp.where(accident, 6 + 4 * power + below(draw(base, S.D_ACCIDENT_DMG), 6), 0)

    # Station trades. Selling ore j: earn units * price, then the price drops by units*mean/64.
    ores = jnp.arange(S.N_ORES)
    sell_one = (act >= S.A_SELL) & (act < S.A_JETTISON)
    sold = jnp.where((act == S.A_SELL_ALL) | (sell_one & (ores == act - S.A_SELL)), cargo, 0)
    st_prices = jax.lax.dynamic_slice(prices, (st_off,), (S.N_ORES,))
    st_means = jax.lax.dynamic_slice(means, (st_off,), (S.N_ORES,))
    delta = (sold * st_prices).sum()
    st_prices = jnp.maximum(st_prices - ((sold * st_means) >> 6), st_means >> 1)
    prices = jnp.where(station >= 0, jax.lax.dynamic_update_slice(prices, st_prices, (st_off,)),
                       prices)
    dumped = ((act >= S.A_JETTISON) & (act < S.A_SELL_ALL) & (ores == act - S.A_JETTISON))
    cargo = jnp.where(dumped, 0, cargo - sold)
    refuel, repair, upgrade = act == S.A_REFUEL, act == S.A_REPAIR, act == S.A_UPGRADE
    delta = delta - jnp.where(refuel, (S.FUEL_MAX - fuel) * S.FUEL_PRICE, 0)
    fuel = jnp.where(refuel, S.FUEL_MAX, fuel)
    delta = delta - jnp.where(repair, (S.HULL_MAX - hull) * S.REPAIR_PRICE, 0)
    hull = jnp.where(repair, S.HULL_MAX, hull)
    delta = delta - jnp.where(upgrade, S.UPGRADE_COST, 0)
    sector = jnp.where(is_warp, target, sector)

    # The sector the ship ends the step in may hit it.
    hazard_now = sectors[sector] & 3
    ambient = (draw(base, S.D_AMBIENT) & 0xFFFF).astype(I32) < hazard_now * S.AMBIENT_P16
    damage = damage + jnp.where(ambient, 5 + below(draw(base, S.D_AMBIENT_DMG), 10), 0)
    hull = jnp.maximum(hull - damage, 0)

    # Prices revert to their means with noise.
    v = 1 + (means >> 3)
    noise = below(draw(base, S.D_PRICE + jnp.arange(S.N_STATIONS * S.N_ORES)), (2 * v + 1).astype(U32)) - v
    prices = jnp.clip(prices + ((means - prices) >> 3) + noise, means >> 1, 2 * means)

    terminated = hull <= 0
    truncated = ~terminated & (t >= max_steps)
    credits_reward = (delta - jnp.where(valid, 0, invalid_penalty)
                      - jnp.where(terminated, loss_penalty, 0))
    ship = ship.at[S.S_T].set(t).at[S.S_SECTOR].set(sector).at[S.S_FUEL].set(fuel)
    ship = ship.at[S.S_HULL].set(hull).at[S.S_CREDITS].add(delta)
    ship = ship.at[S.S_CAP].add(jnp.where(upgrade, S.CARGO_UPGRADE, 0))
    ship = ship.at[S.S_UPGRADES].add(upgrade.astype(I32))
    ship = ship.at[S.S_CARGO : S.S_CARGO + S.N_ORES].set(cargo)
    ship = ship.at[S.S_LAST_DAMAGE].set(damage).at[S.S_LAST_INVALID].set((~valid).astype(I32))
    ship = ship.at[S.S_LAST_DELTA].set(credits_reward)
    state = ProspectorState(ship=ship, asteroids=asteroids, sectors=sectors,
                            market=jnp.concatenate([prices, means]))
    reward = credits_reward.astype(jnp.float32) * jnp.float32(S.REWARD_SCALE)
    return state, reward, terminated, truncated


def next_episode(state: ProspectorState) -> ProspectorState:
    """The fresh episode that follows `state` (seed chain + episode counter)."""
    seed = jax.lax.bitcast_convert_type(state.ship[S.S_SEED], U32)
    fresh = reset_core(mix32(seed + U32(S.NEXT_EPISODE_ADD)))
    return fresh.replace(ship=fresh.ship.at[S.S_EPISODE].set(state.ship[S.S_EPISODE] + 1))


# ---- observation -------------------------------------------------------------------------
def _scaled(x, log2_scale: int):
    return x.astype(jnp.float32) * jnp.float32(2.0**-log2_scale)


def observe(state: ProspectorState, max_steps: int) -> jax.Array:
    """float32[260]; every slot documented in docs/prospector.md."""
    ship, sectors = state.ship, state.sectors
    prices = state.market[: S.N_STATIONS * S.N_ORES].reshape(S.N_STATIONS, S.N_ORES)
    means = state.market[S.N_STATIONS * S.N_ORES :].reshape(S.N_STATIONS, S.N_ORES)
    t, sector, fuel, hull = ship[S.S_T], ship[S.S_SECTOR], ship[S.S_FUEL], ship[S.S_HULL]
    cargo = ship[S.S_CARGO : S.S_CARGO + S.N_ORES]
    used = cargo.sum()
    station = jnp.asarray(STATION_OF_SECTOR)[sector]
    at_station = station >= 0
    here_prices = jnp.where(at_station, prices[jnp.maximum(station, 0)], 0)
    ks = jnp.arange(S.N_SECTORS, dtype=I32)

    ship_block = jnp.concatenate([
        jnp.stack([
            _scaled(max_steps - t, 8), _scaled(fuel, 6), _scaled(hull, 7), _scaled(used, 5),
            _scaled(ship[S.S_CAP] - used, 5),
        ]),
        _scaled(cargo, 5),
        jnp.stack([_scaled(ship[S.S_CREDITS], 12), _scaled(ship[S.S_UPGRADES], 1),
                   at_station.astype(jnp.float32)]),
        (ks == sector).astype(jnp.float32),
        _scaled(here_prices, 6),
        _scaled(cargo * here_prices, 10),
    ])

    ast = state.asteroids.reshape(S.N_SECTORS, S.N_ASTEROIDS)
    ore, richness = ast & 3, (ast >> 2) & 3
    known = (ast & S.AST_KNOWN_BIT) != 0
    left = ast >> S.AST_LEFT_SHIFT
    unit_value = jnp.where(known, richness * jnp.asarray(BASE_PRICE)[ore], 0)
    h_ore, h_known, h_rich = ore[sector], known[sector], richness[sector]
    ast_block = jnp.concatenate([
        (h_ore[:, None] == jnp.arange(S.N_ORES)).astype(jnp.float32),
        h_known[:, None].astype(jnp.float32),
        _scaled(jnp.where(h_known, h_rich, 0), 2)[:, None],
        _scaled(left[sector], 5)[:, None],
        _scaled(unit_value[sector], 7)[:, None],
    ], axis=1).reshape(-1)

    dist = ring_distance(sector, ks)
    live = left > 0
    hazard = sectors & 3
    sec_block = jnp.stack([
        _scaled(hazard, 2),
        ((sectors & S.SEC_SCANNED_BIT) != 0).astype(jnp.float32),
        (STATION_OF_SECTOR >= 0).astype(jnp.float32),
        _scaled(dist, 3),
        _scaled(jnp.where(ks == sector, 0, warp_fuel(dist)), 4),
        _scaled(live.sum(1), 3),
        _scaled(left.sum(1), 8),
        _scaled((live & ~known).sum(1), 3),
        _scaled(jnp.where(live, unit_value, 0).max(1), 7),
        _scaled(jnp.where(live, unit_value * left, 0).sum(1), 14),
    ], axis=1).reshape(-1)

    sta_block = jnp.concatenate([_scaled(prices, 6), _scaled(prices - means, 4)], axis=1).reshape(-1)

    station_dist = ring_distance(sector, STATION_SECTORS)
    best_station = jnp.argmax(prices, axis=0)
    nearest = station_dist.min()
    extra = jnp.concatenate([
        _scaled(prices.max(0), 6),
        _scaled(station_dist[best_station], 3),
        jnp.stack([
            _scaled(nearest, 3),
            _scaled(jnp.where(nearest == 0, 0, warp_fuel(nearest)), 4),
            _scaled(ship[S.S_LAST_DAMAGE], 5),
            ship[S.S_LAST_INVALID].astype(jnp.float32),
            _scaled(ship[S.S_LAST_DELTA], 10),
            (fuel < jnp.where(nearest == 0, 0, warp_fuel(nearest)) + 4).astype(jnp.float32),
            (hull <= 30).astype(jnp.float32),
            (used >= ship[S.S_CAP]).astype(jnp.float32),
            _scaled(hazard[sector], 2),
            _scaled(t, 8),
            (t >= max_steps - 20).astype(jnp.float32),
            jnp.float32(1.0),
        ]),
    ])
    return jnp.concatenate([ship_block, ast_block, sec_block, sta_block, extra])
