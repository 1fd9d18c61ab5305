"""Human play: the server steps the Prospector JAX env with the action a person chose.

A session holds one episode's state on the server; the page sends actions and draws the
returned frame, greying out the actions the env's mask marks invalid. Saving writes the steps
played as a `prospector-replay/1` file (episode 0 of seed S, like every replay) and, when a bot
is named, that bot's replay of the same seed, so the two can be watched side by side.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from jaxrl.envs import make
from jaxrl.envs.prospector import bots, jax_env, replay
from jaxrl.envs.prospector.evaluate import episode_keys

MAX_SESSIONS = 64


def bot_names() -> list[str]:
    return [*bots.BOTS, "random"]


class _Session:
    def __init__(self, seed: int, max_steps: int):
        self.seed = seed
        self.env, self.params = make("prospector", env_impl="jax", max_steps=max_steps)
        start, self.advance = replay.stepper(self.params)
        self.obs, self.state, self.mask = start(episode_keys(seed, 1)[0])
        self.records: list[dict] = []
        self.done = False

    def view(self, frame: dict) -> dict:
        return {"seed": self.seed, "max_steps": self.params.max_steps, "done": self.done,
                "steps": len(self.records), "total": sum(r["reward"] for r in self.records),
                "mask": np.asarray(self.mask).tolist(), "frame": frame}


class PlaySessions:
    def __init__(self):
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def new(self, seed: int, max_steps: int = 200) -> dict:
        if not 1 <= max_steps <= 10_000:
            raise ValueError(f"max_steps must be in 1..10000, got {max_steps}")
        s = _Session(seed, max_steps)
        sid = uuid.uuid4().hex[:12]
        with self._lock:
            while len(self._sessions) >= MAX_SESSIONS:  # drop the oldest
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[sid] = s
        frame = {"t": 0, "action_name": "start", "reward": 0.0, "valid": True,
                 **replay.state_frame(s.state)}
        return {"sid": sid, **s.view(frame)}

    def _get(self, sid: str) -> _Session:
        if sid not in self._sessions:
            raise LookupError(f"no play session {sid!r} (the server restarted?); start a new game")
        return self._sessions[sid]

    def step(self, sid: str, action: int) -> dict:
        s = self._get(sid)
        with self._lock:
            if s.done:
                raise ValueError("the episode is over: save it or start a new game")
            if not 0 <= action < self.action_count:
                raise ValueError(f"action must be in 0..{self.action_count - 1}, got {action}")
            s.state, reward, terminated, truncated, obs, s.mask = s.advance(s.state, action)
            rec = replay.step_record(0, s.state, action, reward, terminated, truncated,
                                     np.asarray(s.obs))
            s.records.append(rec)
            s.obs = obs
            s.done = bool(terminated) or bool(truncated)
            return s.view(rec)

    action_count = jax_env.S.N_ACTIONS

    def save(self, sid: str, run_dir: Path, bot: str | None = None) -> dict:
        s = self._get(sid)
        if not s.records:
            raise ValueError("nothing to save: play at least one step")
        if bot is not None and bot not in bot_names():
            raise ValueError(f"unknown bot {bot!r}; choose one of {', '.join(bot_names())}")
        folder = Path(run_dir) / "replays"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"human-seed{s.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{sid[:4]}.jsonl"
        header = replay.make_header(seed=s.seed, episodes=1, max_steps=s.params.max_steps,
                                    policy="human")
        with (folder / name).open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in [header, *s.records]))
        out = {"replay": f"replays/{name}", "steps": len(s.records),
               "return": round(sum(r["reward"] for r in s.records), 4)}
        if bot is not None:
            fn = bots.BOTS.get(bot, bots.random_policy)
            path = replay.record(folder / f"{bot}-seed{s.seed}-T{s.params.max_steps}.jsonl", fn,
                                 s.env, s.params, seed=s.seed, episodes=1, policy_name=bot)
            _, steps = replay.read(path)
            out["bot"] = {"name": bot, "replay": f"replays/{path.name}", "steps": len(steps),
                          "return": round(sum(r["reward"] for r in steps), 4),
                          "return_same_steps": round(sum(r["reward"] for r in
                                                         steps[: len(s.records)]), 4)}
        return out
