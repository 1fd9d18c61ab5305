"""Baseline bots: hand-written JAX policies `policy(key, obs, params=None) -> action`.

They read only the observation (never the hidden state), so they play the same game PPO does.
Each has a deliberate personality, and an exploitable blind spot:

- greedy_miner: mines the priciest ore in reach at full drill power, never scans, ignores
  hazards; sells everything at the nearest station. Fast money, frequent hull trouble.
- cautious_scanner: scans before it mines, mines only known-rich rock at low power, avoids
  hazardous sectors, repairs early. Safe and slow.
- market_timer: mines like the scanner but in any sector, and sells each ore only where its
  price is at or above the station's mean, travelling to the best station when it pays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.envs.prospector import spec as S


class View:
    """Integer game quantities recovered from an observation (slots: docs/prospector.md)."""

    def __init__(self, obs):
        r = lambda x, k: jnp.round(x * 2.0**k).astype(jnp.int32)  # noqa: E731
        self.fuel = r(obs[1], 6)
        self.hull = r(obs[2], 7)
        self.free = r(obs[4], 5)
        self.cargo = r(obs[5:9], 5)
        self.credits = r(obs[9], 12)
        self.upgrades = r(obs[10], 1)
        self.at_station = obs[11] > 0.5
        self.sector = jnp.argmax(obs[12:24])
        self.here_price = r(obs[24:28], 6)
        ast = obs[S.O_ASTEROIDS : S.O_SECTORS].reshape(S.N_ASTEROIDS, S.AST_FEATURES)
        self.ast_ore = jnp.argmax(ast[:, :4], axis=1)
        self.ast_known = ast[:, 4] > 0.5
        self.ast_rich = r(ast[:, 5], 2)
        self.ast_left = r(ast[:, 6], 5)
        sec = obs[S.O_SECTORS : S.O_STATIONS].reshape(S.N_SECTORS, S.SEC_FEATURES)
        self.hazard = r(sec[:, 0], 2)
        self.scanned = sec[:, 1] > 0.5
        self.is_station = sec[:, 2] > 0.5
        self.dist = r(sec[:, 3], 3)
        self.live = r(sec[:, 5], 3)
        self.unknown = r(sec[:, 7], 3)
        self.best_value = r(sec[:, 8], 7)
        sta = obs[S.O_STATIONS : S.O_EXTRA].reshape(S.N_STATIONS, S.STA_FEATURES)
        self.prices = r(sta[:, :4], 6)
        self.price_vs_mean = r(sta[:, 4:], 4)
        self.time_left = r(obs[0], 8)

    def warp_cost(self, k):
        return 2 + 2 * self.dist[k]

    def warp(self, k):
        return S.A_WARP + k

    def nearest(self, ok):
        """Sector index of the nearest sector where ok[k] (ties: lowest index)."""
        return jnp.argmin(jnp.where(ok, self.dist, 99))

    def mine(self, a, power):
        return S.A_MINE + a * S.N_DRILL_POWERS + power


BASE = np.array(S.ORE_BASE_PRICE, np.int32)  # NumPy: no JAX backend at import


def _first(*pairs):
    """First action whose condition holds (the last pair should be (True, default))."""
    action = pairs[-1][1]
    for cond, act in reversed(pairs[:-1]):
        action = jnp.where(cond, act, action)
    return jnp.asarray(action, jnp.int32)


def _station_chores(v: View, fuel_below: int, hull_below: int):
    """(cond, action) pairs a bot does while docked: sell, repair, refuel, upgrade."""
    return [
        (v.at_station & (v.cargo.sum() > 0), S.A_SELL_ALL),
        (v.at_station & (v.hull < hull_below), S.A_REPAIR),
        (v.at_station & (v.fuel < fuel_below), S.A_REFUEL),
        (v.at_station & (v.upgrades < S.MAX_UPGRADES) & (v.credits >= S.UPGRADE_COST + 100)
         & (v.time_left > 60), S.A_UPGRADE),
    ]


def greedy_miner(key, obs, params=None):
    del key, params
    v = View(obs)
    home = v.nearest(v.is_station)
    # Priciest ore here that is not known to be barren, at full power (or what fuel allows).
    worth = jnp.where((v.ast_left > 0) & ~(v.ast_known & (v.ast_rich == 0)),
                      jnp.asarray(BASE)[v.ast_ore] * 4 + v.ast_left // 8, -1)
    target = jnp.argmax(worth)
    power = jnp.clip(v.fuel - 1, 0, 3)
    go_home = (v.free == 0) | (v.fuel < v.warp_cost(home) + 5) | (v.hull < 25)
    rich_sector = v.nearest((v.live > 0) & (jnp.arange(S.N_SECTORS) != v.sector))
    return _first(
        *_station_chores(v, fuel_below=S.FUEL_MAX, hull_below=60),
        (go_home & ~v.at_station & (v.fuel >= v.warp_cost(home)), v.warp(home)),
        (~go_home & (worth[target] >= 0), v.mine(target, power)),
        (v.fuel >= v.warp_cost(rich_sector) + 8, v.warp(rich_sector)),
        (True, S.A_WAIT),
    )


def cautious_scanner(key, obs, params=None):
    del key, params
    v = View(obs)
    home = v.nearest(v.is_station)
    safe = v.hazard <= 1
    value = jnp.where(v.ast_known & (v.ast_left > 0), v.ast_rich * jnp.asarray(BASE)[v.ast_ore], 0)
    target = jnp.argmax(value)
    go_home = (v.free <= 4) | (v.fuel < v.warp_cost(home) + 8) | (v.hull < 70)
    here_unscanned = ~v.scanned[v.sector] & (v.live[v.sector] > 0)
    # Next sector: best known value among safe ones, else the nearest safe unscanned one.
    good = safe & (v.best_value >= 32) & (jnp.arange(S.N_SECTORS) != v.sector)
    fresh = safe & ~v.scanned & (v.live > 0) & (jnp.arange(S.N_SECTORS) != v.sector)
    best_known = jnp.argmax(jnp.where(good, v.best_value * 8 - v.dist, -1))
    explore = v.nearest(fresh)
    nxt = jnp.where(good.any(), best_known, explore)
    return _first(
        *_station_chores(v, fuel_below=45, hull_below=S.HULL_MAX),
        (go_home & ~v.at_station & (v.fuel >= v.warp_cost(home)), v.warp(home)),
        (~go_home & here_unscanned & safe[v.sector] & (v.fuel >= 2), S.A_SCAN + v.sector),
        (~go_home & safe[v.sector] & (value[target] >= 16) & (v.fuel >= 2), v.mine(target, 1)),
        ((good.any() | fresh.any()) & (v.fuel >= v.warp_cost(nxt) + 10), v.warp(nxt)),
        (True, S.A_WAIT),
    )


def market_timer(key, obs, params=None):
    del key, params
    v = View(obs)
    station_sectors = jnp.array(S.STATION_SECTORS)
    value = jnp.where(v.ast_left > 0,
                      jnp.where(v.ast_known, v.ast_rich * 2, 3) * jnp.asarray(BASE)[v.ast_ore], -1)
    target = jnp.argmax(value)
    # The station where the cargo fetches most (net of fuel to get there), and whether here
    # is good enough: every carried ore at or above its mean price.
    cargo_worth = (v.prices * v.cargo[None, :]).sum(1) - 2 * v.dist[station_sectors]
    best_station = station_sectors[jnp.argmax(cargo_worth)]
    here_idx = jnp.argmax(station_sectors == v.sector)
    fair_here = v.at_station & jnp.all((v.cargo == 0) | (v.price_vs_mean[here_idx] >= 0))
    hurry = v.time_left < 25
    sell_here = v.at_station & (v.cargo.sum() > 0) & (fair_here | hurry | (best_station == v.sector))
    home = v.nearest(v.is_station)
    go_sell = (v.free <= 2) | (v.fuel < v.warp_cost(home) + 6) | (v.hull < 45) | hurry
    dest = jnp.where(v.fuel >= v.warp_cost(best_station) + 2, best_station, home)
    unscanned_here = ~v.scanned[v.sector] & (v.live[v.sector] > 0)
    prospect = v.nearest((v.live > 0) & (jnp.arange(S.N_SECTORS) != v.sector) & (v.hazard <= 2))
    chores = _station_chores(v, fuel_below=50, hull_below=80)[1:]
    return _first(
        (sell_here, S.A_SELL_ALL),
        *chores,
        (go_sell & (dest != v.sector) & (v.fuel >= v.warp_cost(dest)), v.warp(dest)),
        (go_sell & v.at_station & (v.cargo.sum() > 0), S.A_WAIT),  # hold for a better price
        (unscanned_here & (v.fuel >= 3), S.A_SCAN + v.sector),
        ((value[target] > 0) & (v.fuel >= 3), v.mine(target, 2)),
        (v.fuel >= v.warp_cost(prospect) + 8, v.warp(prospect)),
        (True, S.A_WAIT),
    )


def random_policy(key, obs, params=None):
    """Uniform over all 69 actions: the floor every bot must beat."""
    del obs, params
    return jax.random.randint(key, (), 0, S.N_ACTIONS)


BOTS = {
    "greedy_miner": greedy_miner,
    "cautious_scanner": cautious_scanner,
    "market_timer": market_timer,
}
