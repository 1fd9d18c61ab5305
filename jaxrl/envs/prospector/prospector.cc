// Prospector native core: batched reset/step as XLA FFI handlers, plus a tiny CPython module
// (`_native`) that hands the handlers to JAX as PyCapsules.
//
// Every rule mirrors jax_env.py line for line: integer state, the lowbias32 counter RNG with
// the same draw indices, arithmetic shifts, unsigned modulo, and observations computed as
// float(int) * 2^-k. That is what makes the two cores bit-identical (tests/test_prospector.py).
//
// The call is pure: state comes in as XLA buffers and goes out as new buffers (aliased in
// place when XLA can). Any leading dims are batch dims, so `vmap_method="broadcast_all"` works.
// Bad input never reaches undefined behaviour: shapes are checked, out-of-range actions are
// the documented invalid no-op, and a state with out-of-range fields returns an error.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace prospector {

constexpr int kObsDim = 260;
constexpr int kNumActions = 69;
constexpr int kSectors = 12;
constexpr int kAsteroids = 8;
constexpr int kOres = 4;
constexpr int kStations = 3;
constexpr int kPowers = 4;
constexpr int kAllAsteroids = kSectors * kAsteroids;
constexpr int kPrices = kStations * kOres;
constexpr int kStationSectors[kStations] = {0, 4, 8};
constexpr int kStationOfSector[kSectors] = {0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1};
constexpr int kBasePrice[kOres] = {8, 16, 28, 48};

constexpr int kFuelMax = 60, kHullMax = 100, kCargoBase = 20, kCargoUpgrade = 10;
constexpr int kMaxUpgrades = 2, kUpgradeCost = 150, kFuelPrice = 1, kRepairPrice = 2;
constexpr int kAccidentP16 = 1311, kAmbientP16 = 3277;
constexpr float kRewardScale = 0.01f;

constexpr int kWait = 0, kWarp = 1, kScan = kWarp + kSectors, kMine = kScan + kSectors;
constexpr int kSell = kMine + kAsteroids * kPowers, kJettison = kSell + kOres;
constexpr int kSellAll = kJettison + kOres, kRefuel = kSellAll + 1, kRepair = kRefuel + 1;
constexpr int kUpgrade = kRepair + 1;
static_assert(kUpgrade + 1 == kNumActions, "action table must cover 0..68");

// ship[] slots
constexpr int sT = 0, sSector = 1, sFuel = 2, sHull = 3, sCredits = 4, sCap = 5, sUpgrades = 6;
constexpr int sCargo = 7, sLastDamage = 11, sLastInvalid = 12, sLastDelta = 13, sSeed = 14;
constexpr int sEpisode = 15, kShipWords = 16;
constexpr int kKnownBit = 1 << 4, kLeftShift = 8, kScannedBit = 1 << 2;
constexpr int kMarketWords = 2 * kPrices;

constexpr int oAsteroids = 32, oSectors = 96, oStations = 216, oExtra = 240;

constexpr uint32_t kGolden = 0x9E3779B9u, kDrawMul = 0x85EBCA6Bu, kDrawAdd = 0x68E31DA4u;
constexpr uint32_t kNextEpisodeAdd = 0x6A09E667u;
constexpr uint32_t dAccident = 0, dAccidentDmg = 1, dAmbient = 2, dAmbientDmg = 3, dPrice = 4;
constexpr uint32_t rHazard = 0, rAsteroid = 16, rMean = rAsteroid + 3 * kAllAsteroids;

// Largest t / |credits| a valid state can hold (checked so no arithmetic can overflow).
constexpr int kMaxStepsLimit = 100000;
constexpr int kCreditsLimit = 1 << 28;

// The hot loops are built twice, for AVX2 and for baseline x86-64, and the loader picks one
// (ifunc dispatch): AVX2 gives observe's branch-free asteroid sums 8 int32 lanes and a real
// 32-bit multiply. Integer ops and exact power-of-two scalings: both builds are bit-identical.
// `-DMULTIVERSIONED=` builds the baseline alone (the sanitizer test does, so it also holds the
// baseline equal to the AVX2 build).
#ifndef MULTIVERSIONED
#if defined(__x86_64__) && defined(__GNUC__)
#define MULTIVERSIONED __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSIONED
#endif
#endif

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}
inline uint32_t stream(uint32_t seed, uint32_t counter) { return mix32(seed + counter * kGolden); }
inline uint32_t draw(uint32_t base, uint32_t i) { return mix32(base ^ (i * kDrawMul + kDrawAdd)); }
inline int32_t below(uint32_t r, uint32_t n) { return static_cast<int32_t>(r % n); }
// r % n for a divisor known only at run time, through a double division: it vectorises where
// an integer division does not, and it is exact (r < 2^32 and n < 2^21, so the true quotient is
// at least 1/n below the next integer while the division's rounding error is under 2^-21).
inline int32_t below_runtime(uint32_t r, uint32_t n) {
  const uint32_t q = static_cast<uint32_t>(static_cast<double>(r) / static_cast<double>(n));
  return static_cast<int32_t>(r - q * n);
}
inline int ring_distance(int a, int b) {
  int d = a > b ? a - b : b - a;
  return std::min(d, kSectors - d);
}
inline int warp_fuel(int dist) { return 2 + 2 * dist; }
inline int scan_fuel(int dist) { return 1 + (dist >> 1); }
inline float scaled(int32_t x, int log2_scale) {
  return static_cast<float>(x) * (1.0f / static_cast<float>(1 << log2_scale));
}

struct Env {
  int32_t ship[kShipWords];
  int32_t ast[kAllAsteroids];
  int32_t sec[kSectors];
  int32_t mkt[kMarketWords];
};

struct Rules {
  int32_t max_steps, invalid_penalty, loss_penalty;
};

void reset_env(uint32_t seed, Env& e) {
  const uint32_t base = stream(seed, 0);
  for (int k = 0; k < kSectors; ++k)
    e.sec[k] = kStationOfSector[k] >= 0 ? 0 : below(draw(base, rHazard + k), 4);
  for (int i = 0; i < kAllAsteroids; ++i) {
    const int hazard = e.sec[i / kAsteroids];
    const uint32_t k = rAsteroid + 3 * i;
    const int u = below(draw(base, k), 100);
    const int ore = (u >= 40) + (u >= 70) + (u >= 90);
    int richness = below(draw(base, k + 1), 3 + (hazard > 0)) + (hazard >= 2);
    richness = std::min(richness, 3);
    const int units = 12 + below(draw(base, k + 2), 25);
    e.ast[i] = ore | (richness << 2) | (units << kLeftShift);
  }
  for (int m = 0; m < kPrices; ++m) {
    const int mean = kBasePrice[m % kOres] * (75 + below(draw(base, rMean + m), 51)) / 100;
    e.mkt[m] = mean;
    e.mkt[kPrices + m] = mean;
  }
  std::memset(e.ship, 0, sizeof(e.ship));
  e.ship[sFuel] = kFuelMax;
  e.ship[sHull] = kHullMax;
  e.ship[sCap] = kCargoBase;
  e.ship[sSeed] = static_cast<int32_t>(seed);
}

int cargo_used(const Env& e) {
  return e.ship[sCargo] + e.ship[sCargo + 1] + e.ship[sCargo + 2] + e.ship[sCargo + 3];
}

bool action_valid(const Env& e, int a) {
  if (a < 0 || a >= kNumActions) return false;
  const int sector = e.ship[sSector], fuel = e.ship[sFuel];
  const bool at_station = kStationOfSector[sector] >= 0;
  if (a == kWait) return true;
  if (a < kScan) {
    const int k = a - kWarp;
    return k != sector && fuel >= warp_fuel(ring_distance(sector, k));
  }
  if (a < kMine) {
    const int k = a - kScan;
    return (e.sec[k] & kScannedBit) == 0 && fuel >= scan_fuel(ring_distance(sector, k));
  }
  if (a < kSell) {
    const int idx = a - kMine, power = idx % kPowers;
    const int left = e.ast[sector * kAsteroids + idx / kPowers] >> kLeftShift;
    return left > 0 && e.ship[sCap] - cargo_used(e) > 0 && fuel >= power + 1;
  }
  if (a < kJettison) return at_station && e.ship[sCargo + a - kSell] > 0;
  if (a < kSellAll) return e.ship[sCargo + a - kJettison] > 0;
  if (a == kSellAll) return at_station && cargo_used(e) > 0;
  if (a == kRefuel) return at_station && fuel < kFuelMax;
  if (a == kRepair) return at_station && e.ship[sHull] < kHullMax;
  return at_station && e.ship[sUpgrades] < kMaxUpgrades && e.ship[sCredits] >= kUpgradeCost;
}

// Returns the name of the first out-of-range field, or nullptr for a valid state.
MULTIVERSIONED const char* invalid_field(const Env& e, const Rules& r) {
  const int32_t* s = e.ship;
  if (s[sT] < 0 || s[sT] >= r.max_steps) return "ship[t]";
  if (s[sSector] < 0 || s[sSector] >= kSectors) return "ship[sector]";
  if (s[sFuel] < 0 || s[sFuel] > kFuelMax) return "ship[fuel]";
  if (s[sHull] <= 0 || s[sHull] > kHullMax) return "ship[hull]";
  if (s[sCredits] < -kCreditsLimit || s[sCredits] > kCreditsLimit) return "ship[credits]";
  if (s[sUpgrades] < 0 || s[sUpgrades] > kMaxUpgrades) return "ship[upgrades]";
  if (s[sCap] != kCargoBase + kCargoUpgrade * s[sUpgrades]) return "ship[cap]";
  for (int j = 0; j < kOres; ++j)
    if (s[sCargo + j] < 0 || s[sCargo + j] > s[sCap]) return "ship[cargo]";
  if (cargo_used(e) > s[sCap]) return "ship[cargo]";
  if (s[sLastDelta] < -kCreditsLimit || s[sLastDelta] > kCreditsLimit) return "ship[last_delta]";
  // Whole-array scans without early exits, so they vectorise: every step runs them.
  int bad = 0;
  for (int i = 0; i < kAllAsteroids; ++i)
    bad |= (e.ast[i] < 0) | (e.ast[i] >= (256 << kLeftShift)) | ((e.ast[i] & 0xE0) != 0);
  if (bad) return "asteroids";
  for (int k = 0; k < kSectors; ++k) bad |= (e.sec[k] < 0) | (e.sec[k] > 7);
  if (bad) return "sectors";
  for (int m = 0; m < kMarketWords; ++m) bad |= (e.mkt[m] < 0) | (e.mkt[m] > (1 << 16));
  return bad ? "market" : nullptr;
}

// One transition without auto-reset (mirrors jax_env.step_core).
MULTIVERSIONED void step_env(Env& e, int32_t action, const Rules& r, float* reward,
                             bool* terminated, bool* truncated) {
  const bool valid = action_valid(e, action);
  const int act = valid ? action : kWait;
  const int t = e.ship[sT] + 1;
  const uint32_t base = stream(static_cast<uint32_t>(e.ship[sSeed]), static_cast<uint32_t>(t));
  int sector = e.ship[sSector], fuel = e.ship[sFuel], hull = e.ship[sHull];
  int32_t* cargo = e.ship + sCargo;
  int32_t* prices = e.mkt;
  const int32_t* means = e.mkt + kPrices;
  const int station = kStationOfSector[sector];
  int delta = 0, damage = 0;

  if (act >= kWarp && act < kScan) {
    const int k = act - kWarp;
    fuel -= warp_fuel(ring_distance(sector, k));
    sector = k;
  } else if (act >= kScan && act < kMine) {
    const int k = act - kScan;
    fuel -= scan_fuel(ring_distance(sector, k));
    e.sec[k] |= kScannedBit;
    for (int a = 0; a < kAsteroids; ++a) e.ast[k * kAsteroids + a] |= kKnownBit;
  } else if (act >= kMine && act < kSell) {
    const int idx = act - kMine, power = idx % kPowers;
    const int slot = sector * kAsteroids + idx / kPowers;
    const int packed = e.ast[slot];
    const int ore = packed & 3, richness = (packed >> 2) & 3, left = packed >> kLeftShift;
    const int free_space = e.ship[sCap] - cargo_used(e);
    const int mined = std::min(std::min(left, free_space), (power + 1) * richness);
    e.ast[slot] = ((packed & 0xFF) | kKnownBit) | ((left - mined) << kLeftShift);
    cargo[ore] += mined;
    fuel -= power + 1;
    const int hazard = e.sec[sector] & 3;
    if (static_cast<int>(draw(base, dAccident) & 0xFFFF) < hazard * (power + 1) * kAccidentP16)
      damage = 6 + 4 * power + below(draw(base, dAccidentDmg), 6);
  } else if ((act >= kSell && act < kJettison) || act == kSellAll) {
    const int off = station * kOres;
    for (int j = 0; j < kOres; ++j) {
      if (act != kSellAll && j != act - kSell) continue;
      const int sold = cargo[j];
      delta += sold * prices[off + j];
      prices[off + j] = std::max(prices[off + j] - ((sold * means[off + j]) >> 6), means[off + j] >> 1);
      cargo[j] = 0;
    }
  } else if (act >= kJettison && act < kSellAll) {
    cargo[act - kJettison] = 0;
  } else if (act == kRefuel) {
    delta -= (kFuelMax - fuel) * kFuelPrice;
    fuel = kFuelMax;
  } else if (act == kRepair) {
    delta -= (kHullMax - hull) * kRepairPrice;
    hull = kHullMax;
  } else if (act == kUpgrade) {
    delta -= kUpgradeCost;
    e.ship[sCap] += kCargoUpgrade;
    e.ship[sUpgrades] += 1;
  }

  const int hazard_now = e.sec[sector] & 3;
  if (static_cast<int>(draw(base, dAmbient) & 0xFFFF) < hazard_now * kAmbientP16)
    damage += 5 + below(draw(base, dAmbientDmg), 10);
  hull = std::max(hull - damage, 0);

  for (int m = 0; m < kPrices; ++m) {
    const int v = 1 + (means[m] >> 3);
    const int noise = below_runtime(draw(base, dPrice + m), 2 * v + 1) - v;
    const int p = prices[m] + ((means[m] - prices[m]) >> 3) + noise;
    prices[m] = std::min(std::max(p, means[m] >> 1), 2 * means[m]);
  }

  *terminated = hull <= 0;
  *truncated = !*terminated && t >= r.max_steps;
  const int credits_reward =
      delta - (valid ? 0 : r.invalid_penalty) - (*terminated ? r.loss_penalty : 0);
  e.ship[sT] = t;
  e.ship[sSector] = sector;
  e.ship[sFuel] = fuel;
  e.ship[sHull] = hull;
  e.ship[sCredits] += delta;
  e.ship[sLastDamage] = damage;
  e.ship[sLastInvalid] = valid ? 0 : 1;
  e.ship[sLastDelta] = credits_reward;
  *reward = static_cast<float>(credits_reward) * kRewardScale;
}

void next_episode(Env& e) {
  const uint32_t seed = static_cast<uint32_t>(e.ship[sSeed]);
  const uint32_t episode = static_cast<uint32_t>(e.ship[sEpisode]) + 1u;  // wraps, never UB
  reset_env(mix32(seed + kNextEpisodeAdd), e);
  e.ship[sEpisode] = static_cast<int32_t>(episode);
}

MULTIVERSIONED void observe(const Env& e, int max_steps, float* o) {
  const int32_t* s = e.ship;
  const int t = s[sT], sector = s[sSector], fuel = s[sFuel], hull = s[sHull];
  const int used = cargo_used(e);
  const int station = kStationOfSector[sector];
  const bool at_station = station >= 0;
  const int32_t* prices = e.mkt;
  const int32_t* means = e.mkt + kPrices;

  // Ship block [0, 32).
  o[0] = scaled(max_steps - t, 8);
  o[1] = scaled(fuel, 6);
  o[2] = scaled(hull, 7);
  o[3] = scaled(used, 5);
  o[4] = scaled(s[sCap] - used, 5);
  for (int j = 0; j < kOres; ++j) o[5 + j] = scaled(s[sCargo + j], 5);
  o[9] = scaled(s[sCredits], 12);
  o[10] = scaled(s[sUpgrades], 1);
  o[11] = at_station ? 1.0f : 0.0f;
  for (int k = 0; k < kSectors; ++k) o[12 + k] = k == sector ? 1.0f : 0.0f;
  for (int j = 0; j < kOres; ++j) {
    const int price = at_station ? prices[station * kOres + j] : 0;
    o[24 + j] = scaled(price, 6);
    o[28 + j] = scaled(s[sCargo + j] * price, 10);
  }

  // The current sector's asteroids [32, 96).
  for (int a = 0; a < kAsteroids; ++a) {
    const int packed = e.ast[sector * kAsteroids + a];
    const int ore = packed & 3, richness = (packed >> 2) & 3, left = packed >> kLeftShift;
    const bool known = (packed & kKnownBit) != 0;
    float* f = o + oAsteroids + 8 * a;
    for (int j = 0; j < kOres; ++j) f[j] = ore == j ? 1.0f : 0.0f;
    f[4] = known ? 1.0f : 0.0f;
    f[5] = scaled(known ? richness : 0, 2);
    f[6] = scaled(left, 5);
    f[7] = scaled(known ? richness * kBasePrice[ore] : 0, 7);
  }

  // Sectors [96, 216). The asteroid sums are branch-free (this loop was most of a step's time
  // while it branched on each asteroid): a valid state has left >= 0, so a mined-out asteroid
  // adds 0 to left_sum and value_sum unconditionally and `alive` masks the rest.
  for (int k = 0; k < kSectors; ++k) {
    const int hazard = e.sec[k] & 3, dist = ring_distance(sector, k);
    int live = 0, left_sum = 0, unknown = 0, best = 0, value_sum = 0;
    const int32_t* row = e.ast + k * kAsteroids;
    for (int a = 0; a < kAsteroids; ++a) {
      const int packed = row[a];
      const int richness = (packed >> 2) & 3, left = packed >> kLeftShift;
      const int known = (packed & kKnownBit) != 0, alive = left > 0;
      const int unit_value = known * richness * kBasePrice[packed & 3];
      live += alive;
      left_sum += left;
      unknown += alive & (known ^ 1);
      best = std::max(best, alive * unit_value);
      value_sum += unit_value * left;
    }
    float* f = o + oSectors + 10 * k;
    f[0] = scaled(hazard, 2);
    f[1] = (e.sec[k] & kScannedBit) ? 1.0f : 0.0f;
    f[2] = kStationOfSector[k] >= 0 ? 1.0f : 0.0f;
    f[3] = scaled(dist, 3);
    f[4] = scaled(k == sector ? 0 : warp_fuel(dist), 4);
    f[5] = scaled(live, 3);
    f[6] = scaled(left_sum, 8);
    f[7] = scaled(unknown, 3);
    f[8] = scaled(best, 7);
    f[9] = scaled(value_sum, 14);
  }

  // Stations [216, 240).
  for (int st = 0; st < kStations; ++st)
    for (int j = 0; j < kOres; ++j) {
      const int m = st * kOres + j;
      o[oStations + 8 * st + j] = scaled(prices[m], 6);
      o[oStations + 8 * st + 4 + j] = scaled(prices[m] - means[m], 4);
    }

  // Extra summary slots [240, 260).
  int station_dist[kStations], nearest = kSectors;
  for (int st = 0; st < kStations; ++st) {
    station_dist[st] = ring_distance(sector, kStationSectors[st]);
    nearest = std::min(nearest, station_dist[st]);
  }
  for (int j = 0; j < kOres; ++j) {
    int best_st = 0;  // first station with the highest price (argmax)
    for (int st = 1; st < kStations; ++st)
      if (prices[st * kOres + j] > prices[best_st * kOres + j]) best_st = st;
    o[oExtra + j] = scaled(prices[best_st * kOres + j], 6);
    o[oExtra + 4 + j] = scaled(station_dist[best_st], 3);
  }
  const int home_fuel = nearest == 0 ? 0 : warp_fuel(nearest);
  o[oExtra + 8] = scaled(nearest, 3);
  o[oExtra + 9] = scaled(home_fuel, 4);
  o[oExtra + 10] = scaled(s[sLastDamage], 5);
  o[oExtra + 11] = static_cast<float>(s[sLastInvalid]);
  o[oExtra + 12] = scaled(s[sLastDelta], 10);
  o[oExtra + 13] = fuel < home_fuel + 4 ? 1.0f : 0.0f;
  o[oExtra + 14] = hull <= 30 ? 1.0f : 0.0f;
  o[oExtra + 15] = used >= s[sCap] ? 1.0f : 0.0f;
  o[oExtra + 16] = scaled(e.sec[sector] & 3, 2);
  o[oExtra + 17] = scaled(t, 8);
  o[oExtra + 18] = t >= max_steps - 20 ? 1.0f : 0.0f;
  o[oExtra + 19] = 1.0f;
}

// ---- batching ------------------------------------------------------------------------------

// Runs body(begin, end) over [0, n) on the caller plus XLA's intra-op pool. Chunks are claimed
// from a shared counter, so the caller never waits on work nobody started (no deadlock when
// the pool is busy), and late-starting tasks find nothing left and exit.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Body body) {
  // Up to 512 envs a chunk; a smaller batch gets a chunk per pool thread (the caller not
  // counted), down to 32 envs: a 64-env call is ~14 us on one core, so a second core pays off.
  // Measured on a 2-core EPYC: fixed 32-env chunks slowed 1024 envs (8.5M -> 5.7-6.8M env
  // steps/s), and so did counting the caller (three chunks for two cores: 5.3M).
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunk = std::clamp<int64_t>((n + threads - 1) / threads, 32, 512);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, chunk, chunks, body]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) {
  }
}

ffi::Error check_rules(const Rules& r) {
  if (r.max_steps < 1 || r.max_steps > kMaxStepsLimit)
    return ffi::Error::InvalidArgument("prospector: max_steps must be in [1, 100000], got " +
                                       std::to_string(r.max_steps));
  if (r.invalid_penalty < 0 || r.invalid_penalty > 1000000 || r.loss_penalty < 0 ||
      r.loss_penalty > 1000000)
    return ffi::Error::InvalidArgument("prospector: penalties must be in [0, 1e6]");
  return ffi::Error::Success();
}

// Batch size implied by a buffer whose trailing dim is `width` (1 for per-env scalars).
ffi::Error batch_of(const char* name, const ffi::AnyBuffer::Dimensions& dims, int64_t width,
                    int64_t expected, int64_t* batch) {
  int64_t elements = 1;
  for (auto d : dims) elements *= d;
  if (width > 1 && (dims.size() == 0 || dims.back() != width))
    return ffi::Error::InvalidArgument(std::string("prospector: ") + name +
                                       " must have trailing dimension " + std::to_string(width));
  *batch = elements / width;
  if (expected >= 0 && *batch != expected)
    return ffi::Error::InvalidArgument(std::string("prospector: ") + name + " holds " +
                                       std::to_string(*batch) + " envs but the action batch has " +
                                       std::to_string(expected));
  return ffi::Error::Success();
}

void load(Env& e, const int32_t* ship, const int32_t* ast, const int32_t* sec,
          const int32_t* mkt, int64_t i) {
  std::memcpy(e.ship, ship + i * kShipWords, sizeof(e.ship));
  std::memcpy(e.ast, ast + i * kAllAsteroids, sizeof(e.ast));
  std::memcpy(e.sec, sec + i * kSectors, sizeof(e.sec));
  std::memcpy(e.mkt, mkt + i * kMarketWords, sizeof(e.mkt));
}

void store(const Env& e, int32_t* ship, int32_t* ast, int32_t* sec, int32_t* mkt, int64_t i) {
  std::memcpy(ship + i * kShipWords, e.ship, sizeof(e.ship));
  std::memcpy(ast + i * kAllAsteroids, e.ast, sizeof(e.ast));
  std::memcpy(sec + i * kSectors, e.sec, sizeof(e.sec));
  std::memcpy(mkt + i * kMarketWords, e.mkt, sizeof(e.mkt));
}

ffi::Error ResetManyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> seeds,
                         ffi::ResultBuffer<ffi::S32> ship, ffi::ResultBuffer<ffi::S32> ast,
                         ffi::ResultBuffer<ffi::S32> sec, ffi::ResultBuffer<ffi::S32> mkt,
                         ffi::ResultBuffer<ffi::F32> obs, int32_t max_steps) {
  const Rules rules{max_steps, 0, 0};
  if (auto err = check_rules(rules); !err.success()) return err;
  const int64_t n = seeds.element_count();
  const uint32_t* seed = seeds.typed_data();
  int32_t *o_ship = ship->typed_data(), *o_ast = ast->typed_data(), *o_sec = sec->typed_data(),
          *o_mkt = mkt->typed_data();
  float* o_obs = obs->typed_data();
  parallel_for(pool, n, [=](int64_t begin, int64_t end) {
    Env e;
    for (int64_t i = begin; i < end; ++i) {
      reset_env(seed[i], e);
      observe(e, max_steps, o_obs + i * kObsDim);
      store(e, o_ship, o_ast, o_sec, o_mkt, i);
    }
  });
  return ffi::Error::Success();
}

ffi::Error StepManyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ship, ffi::Buffer<ffi::S32> ast,
                        ffi::Buffer<ffi::S32> sec, ffi::Buffer<ffi::S32> mkt,
                        ffi::Buffer<ffi::S32> actions, ffi::ResultBuffer<ffi::S32> ship_out,
                        ffi::ResultBuffer<ffi::S32> ast_out, ffi::ResultBuffer<ffi::S32> sec_out,
                        ffi::ResultBuffer<ffi::S32> mkt_out, ffi::ResultBuffer<ffi::F32> obs,
                        ffi::ResultBuffer<ffi::F32> reward, ffi::ResultBuffer<ffi::PRED> terminated,
                        ffi::ResultBuffer<ffi::PRED> truncated,
                        ffi::ResultBuffer<ffi::F32> final_obs, int32_t max_steps,
                        int32_t invalid_penalty, int32_t loss_penalty) {
  const Rules rules{max_steps, invalid_penalty, loss_penalty};
  if (auto err = check_rules(rules); !err.success()) return err;
  const int64_t n = actions.element_count();
  int64_t b;
  if (auto err = batch_of("state.ship", ship.dimensions(), kShipWords, n, &b); !err.success())
    return err;
  if (auto err = batch_of("state.asteroids", ast.dimensions(), kAllAsteroids, n, &b);
      !err.success())
    return err;
  if (auto err = batch_of("state.sectors", sec.dimensions(), kSectors, n, &b); !err.success())
    return err;
  if (auto err = batch_of("state.market", mkt.dimensions(), kMarketWords, n, &b); !err.success())
    return err;

  const int32_t *i_ship = ship.typed_data(), *i_ast = ast.typed_data(), *i_sec = sec.typed_data(),
                *i_mkt = mkt.typed_data(), *act = actions.typed_data();
  int32_t *o_ship = ship_out->typed_data(), *o_ast = ast_out->typed_data(),
          *o_sec = sec_out->typed_data(), *o_mkt = mkt_out->typed_data();
  float *o_obs = obs->typed_data(), *o_rew = reward->typed_data(), *o_fin = final_obs->typed_data();
  bool *o_term = terminated->typed_data(), *o_trunc = truncated->typed_data();
  // The first env (lowest index) with an out-of-range field; its outputs are left unwritten
  // and the whole call fails, so a corrupt state never reaches the game rules.
  std::atomic<int64_t> first_bad{n};
  std::atomic<int64_t>* bad = &first_bad;
  parallel_for(pool, n, [=](int64_t begin, int64_t end) {
    Env e;
    for (int64_t i = begin; i < end; ++i) {
      load(e, i_ship, i_ast, i_sec, i_mkt, i);
      if (invalid_field(e, rules)) {
        int64_t seen = bad->load();
        while (i < seen && !bad->compare_exchange_weak(seen, i)) {
        }
        continue;
      }
      step_env(e, act[i], rules, o_rew + i, o_term + i, o_trunc + i);
      // final_obs is written only where the episode ended (the binding selects obs elsewhere):
      // one 1 KB observation per step instead of two is what large batches are bound by.
      if (o_term[i] || o_trunc[i]) {
        observe(e, rules.max_steps, o_fin + i * kObsDim);
        next_episode(e);
      }
      observe(e, rules.max_steps, o_obs + i * kObsDim);
      store(e, o_ship, o_ast, o_sec, o_mkt, i);
    }
  });
  if (const int64_t i = first_bad.load(); i < n) {
    Env e;  // env i was skipped, so its input is intact even when aliased to the output
    load(e, i_ship, i_ast, i_sec, i_mkt, i);
    return ffi::Error::InvalidArgument(
        std::string("prospector: env ") + std::to_string(i) + " has an out-of-range " +
        invalid_field(e, rules) +
        "; pass states produced by reset/step with the same max_steps");
  }
  return ffi::Error::Success();
}

}  // namespace prospector

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProspectorResetMany, prospector::ResetManyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("max_steps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProspectorStepMany, prospector::StepManyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("max_steps")
                                  .Attr<int32_t>("invalid_penalty")
                                  .Attr<int32_t>("loss_penalty"));

// ---- CPython module ----------------------------------------------------------------------------

static PyObject* registrations(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (!out) return nullptr;
  const std::pair<const char*, void*> targets[] = {
      {"prospector_reset_many", reinterpret_cast<void*>(ProspectorResetMany)},
      {"prospector_step_many", reinterpret_cast<void*>(ProspectorStepMany)},
  };
  for (const auto& [name, fn] : targets) {
    PyObject* capsule = PyCapsule_New(fn, nullptr, nullptr);
    if (!capsule || PyDict_SetItemString(out, name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return out;
}

static PyObject* constants(PyObject*, PyObject*) {
  using namespace prospector;
  return Py_BuildValue(
      "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:I,"
      "s:I,s:I,s:I}",
      "OBS_DIM", kObsDim, "N_ACTIONS", kNumActions, "N_SECTORS", kSectors, "N_ASTEROIDS",
      kAsteroids, "N_ORES", kOres, "N_STATIONS", kStations, "N_DRILL_POWERS", kPowers,
      "FUEL_MAX", kFuelMax, "HULL_MAX", kHullMax, "CARGO_BASE", kCargoBase, "CARGO_UPGRADE",
      kCargoUpgrade, "MAX_UPGRADES", kMaxUpgrades, "UPGRADE_COST", kUpgradeCost, "FUEL_PRICE",
      kFuelPrice, "REPAIR_PRICE", kRepairPrice, "ACCIDENT_P16", kAccidentP16, "AMBIENT_P16",
      kAmbientP16, "A_SELL", kSell, "A_UPGRADE", kUpgrade, "O_STATIONS", oStations, "O_EXTRA",
      oExtra, "GOLDEN", kGolden, "DRAW_MUL", kDrawMul, "DRAW_ADD", kDrawAdd, "NEXT_EPISODE_ADD",
      kNextEpisodeAdd);
}

static PyMethodDef kMethods[] = {
    {"registrations", registrations, METH_NOARGS, "FFI target name -> PyCapsule of the handler."},
    {"constants", constants, METH_NOARGS, "Rule constants compiled into this core."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native",
                              "Prospector C++ core (XLA FFI handlers).", -1, kMethods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&kModule); }
