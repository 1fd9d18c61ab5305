"""Prospector rules as constants: the one place both implementations (JAX, C++) agree on.

`prospector.cc` mirrors every number here; `tests/test_prospector.py` checks the two tables
match through `native.constants()`. `docs/prospector.md` explains the rules in prose.

All game state is integer. Observations are `float32(int) * 2**-k` (exact, one rounding) and the
reward is `float32(credit_delta) * 0.01f`, so the JAX and C++ cores agree bit for bit.
"""

OBS_DIM = 260
N_ACTIONS = 69

N_SECTORS = 12  # a ring: sector 11 neighbours sector 0
N_ASTEROIDS = 8  # per sector
N_ORES = 4  # iron, copper, cobalt, platinum
ORE_NAMES = ("iron", "copper", "cobalt", "platinum")
ORE_BASE_PRICE = (8, 16, 28, 48)  # credits per unit at an average station
STATION_SECTORS = (0, 4, 8)
N_STATIONS = len(STATION_SECTORS)
N_DRILL_POWERS = 4

MAX_STEPS = 200  # default time limit (ProspectorParams.max_steps)
FUEL_MAX = 60
HULL_MAX = 100
CARGO_BASE = 20
CARGO_UPGRADE = 10
MAX_UPGRADES = 2
UPGRADE_COST = 150
FUEL_PRICE = 1  # credits per fuel unit at a station
REPAIR_PRICE = 2  # credits per hull point
INVALID_PENALTY = 2  # credits (reward -0.02)
LOSS_PENALTY = 1000  # credits (reward -10) when the hull reaches 0
REWARD_SCALE = 0.01  # reward = credits * REWARD_SCALE

# Probabilities are out of 65536 and compared with the low 16 bits of a draw.
ACCIDENT_P16 = 1311  # per hazard level per (drill power + 1): ~2%
AMBIENT_P16 = 3277  # per hazard level per step spent in the sector: ~5%

# ---- actions ---------------------------------------------------------------------------
A_WAIT = 0
A_WARP = 1  # 1..12: warp to sector k
A_SCAN = A_WARP + N_SECTORS  # 13..24: scan sector k
A_MINE = A_SCAN + N_SECTORS  # 25..56: mine asteroid a at drill power p: 25 + 4a + p
A_SELL = A_MINE + N_ASTEROIDS * N_DRILL_POWERS  # 57..60: sell all units of ore j
A_JETTISON = A_SELL + N_ORES  # 61..64: dump all units of ore j
A_SELL_ALL = A_JETTISON + N_ORES  # 65
A_REFUEL = A_SELL_ALL + 1  # 66
A_REPAIR = A_REFUEL + 1  # 67
A_UPGRADE = A_REPAIR + 1  # 68
assert A_UPGRADE + 1 == N_ACTIONS

# ---- state layout (all int32) ------------------------------------------------------------
# ship[16]
S_T, S_SECTOR, S_FUEL, S_HULL, S_CREDITS, S_CAP, S_UPGRADES = range(7)
S_CARGO = 7  # 7..10
S_LAST_DAMAGE, S_LAST_INVALID, S_LAST_DELTA, S_SEED, S_EPISODE = range(11, 16)
SHIP_WORDS = 16
# asteroids[96], index sector * 8 + a: bits 0-1 ore, 2-3 richness, 4 known, 8-15 units left
AST_KNOWN_BIT = 1 << 4
AST_LEFT_SHIFT = 8
# sectors[12]: bits 0-1 hazard level, bit 2 scanned
SEC_SCANNED_BIT = 1 << 2
# market[24]: prices[station * 4 + ore] then means[station * 4 + ore]
MARKET_WORDS = 2 * N_STATIONS * N_ORES

# ---- observation layout ------------------------------------------------------------------
O_SHIP = 0  # 32 slots, see docs/prospector.md
O_ASTEROIDS = 32  # 8 asteroids of the current sector x 8 features
AST_FEATURES = 8
O_SECTORS = O_ASTEROIDS + N_ASTEROIDS * AST_FEATURES  # 96: 12 sectors x 10 features
SEC_FEATURES = 10
O_STATIONS = O_SECTORS + N_SECTORS * SEC_FEATURES  # 216: 3 stations x 8 features
STA_FEATURES = 8
O_EXTRA = O_STATIONS + N_STATIONS * STA_FEATURES  # 240: 20 summary slots
assert O_EXTRA + 20 == OBS_DIM

# ---- counter-based RNG: draw(seed, counter, i) -------------------------------------------
# Reset uses counter 0; step t (1-based, after the increment) uses counter t.
GOLDEN = 0x9E3779B9
DRAW_MUL = 0x85EBCA6B
DRAW_ADD = 0x68E31DA4
NEXT_EPISODE_ADD = 0x6A09E667
# Step draw indices.
D_ACCIDENT, D_ACCIDENT_DMG, D_AMBIENT, D_AMBIENT_DMG, D_PRICE = 0, 1, 2, 3, 4  # D_PRICE..+11
# Reset draw indices.
R_HAZARD = 0  # + sector
R_ASTEROID = 16  # + 3 * (sector * 8 + a) + {0: ore, 1: richness, 2: units}
R_MEAN = R_ASTEROID + 3 * N_SECTORS * N_ASTEROIDS  # + station * 4 + ore
