"""The run browser's HTTP + websocket API and its static page (FastAPI).

Every endpoint answers bad input with `{"error": message}` and a 4xx/5xx status, never a
stack trace; the page shows the message. Files are read only inside the run directories the
server was started with (`runs.safe_path`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from jaxrl.view import runs as R

STATIC = Path(__file__).parent / "static"
PAGE_MAX = 1000  # frames per replay page, at most
log = logging.getLogger("jaxrl.view")


class NotFound(LookupError):
    pass


def create_app(run_args: list[str]) -> FastAPI:
    app = FastAPI(title="jaxrl run browser", docs_url=None, redoc_url=None, openapi_url=None)
    index = R.LineIndex()
    plays = None  # created on first use: it imports JAX

    def answer(code: int):
        async def handler(request: Request, exc: Exception):
            log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
            return JSONResponse({"error": str(exc) or type(exc).__name__}, status_code=code)
        return handler

    # Most specific class wins: a refused path (a ValueError) is 403, not 400.
    for exc_class, code in ((R.Refused, 403), (LookupError, 404), (ValueError, 400),
                            (Exception, 500)):
        app.add_exception_handler(exc_class, answer(code))

    seen = {"at": -1e9, "runs": {}}

    def current_runs() -> dict[str, R.Run]:
        """Discovered afresh (new runs appear), but at most every 2 s: pages poll."""
        if time.monotonic() - seen["at"] > 2.0:
            seen.update(at=time.monotonic(), runs=R.discover(run_args))
        return seen["runs"]

    def run_of(run_id: str) -> R.Run:
        found = current_runs()
        if run_id not in found:
            raise NotFound(f"no run {run_id!r}; known runs: {', '.join(found) or 'none'}")
        run = found[run_id]
        if run.error:
            raise NotFound(run.error)
        return run

    def replay_file(run_id: str, path: str) -> Path:
        file = R.safe_path(run_of(run_id), path)
        if not file.is_file():
            raise NotFound(f"no file {path!r} in run {run_id!r}")
        return file

    def replay_page(file: Path, start: int, count: int) -> dict:
        from jaxrl.envs.prospector import replay  # imports JAX: only when a replay is opened

        head = index.lines(file, 0, 1)
        if not head:
            raise ValueError(f"{file.name}: empty replay file")
        try:
            header = json.loads(head[0])
        except json.JSONDecodeError:
            raise ValueError(f"{file.name}: the first line is not a JSON header") from None
        replay.check_header(header, file.name)
        total = len(index.offsets(file)) - 1
        start, count = max(0, start), max(0, min(count, PAGE_MAX))
        frames = []
        for i, line in enumerate(index.lines(file, start + 1, count)):
            try:
                frames.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{file.name}: step line {start + i + 1} is not valid JSON"
                                 ) from None
        return {"header": header, "total": total, "start": start, "frames": frames}

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def list_runs():
        return {"runs": [R.summary(r) for r in current_runs().values()]}

    @app.get("/api/metrics")
    def metrics(run: str, offset: int = 0, line: int = 0, file_id: str = ""):
        return R.read_metrics(run_of(run), offset, line, file_id)

    @app.get("/api/diff")
    def diff(a: str, b: str):
        configs = {}
        for run in (a, b):
            config, error = R.read_config(run_of(run))
            if config is None:
                raise ValueError(f"cannot diff: {run}: {error or 'no config.yaml'}")
            configs[run] = config
        return {"a": a, "b": b, "rows": R.config_diff(configs[a], configs[b])}

    @app.get("/api/evals")
    def evals(run: str):
        return {"files": R.list_json(run_of(run))}

    @app.get("/api/samples")
    def samples(run: str, q: str = "", offset: int = 0, limit: int = 50):
        return R.search_samples(run_of(run), q, max(0, offset), max(1, min(limit, 500)))

    @app.get("/api/file")
    def file(run: str, path: str):
        return FileResponse(replay_file(run, path))

    @app.get("/api/replay")
    def replay_http(run: str, path: str, start: int = 0, count: int = 100):
        return replay_page(replay_file(run, path), start, count)

    @app.websocket("/ws/replay")
    async def replay_ws(ws: WebSocket, run: str, path: str):
        """Pull-based stream: the client asks {"start", "count"}, gets that page back."""
        await ws.accept()
        try:
            file = replay_file(run, path)
            while True:
                ask = await ws.receive_json()
                await ws.send_json(replay_page(file, int(ask.get("start", 0)),
                                               int(ask.get("count", 100))))
        except WebSocketDisconnect:
            return
        except Exception as e:  # noqa: BLE001 - the page shows it, the server goes on
            await ws.send_json({"error": str(e) or type(e).__name__})
            await ws.close()

    def sessions():
        nonlocal plays
        if plays is None:
            from jaxrl.view.play import PlaySessions

            plays = PlaySessions()
        return plays

    @app.post("/api/play/new")
    def play_new(body: dict):
        return sessions().new(int(body.get("seed", 0)), int(body.get("max_steps", 200)))

    @app.post("/api/play/{sid}/step")
    def play_step(sid: str, body: dict):
        if not isinstance(body.get("action"), int):
            raise ValueError(f"the body must be {{\"action\": <int>}}, got {body}")
        return sessions().step(sid, body["action"])

    @app.post("/api/play/{sid}/save")
    def play_save(sid: str, body: dict):
        run = run_of(body["run"])
        return {"run": run.id, **sessions().save(sid, run.path, body.get("bot") or None)}

    @app.get("/api/play/bots")
    def play_bots():
        from jaxrl.view.play import bot_names

        return {"bots": bot_names()}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
