"""The run browser (`python -m jaxrl.view`): a real server process and headless Chromium.

One server and one browser page for the whole module. Run dirs are small synthetic files,
except the replays: a PPO run dir (initialised, checkpointed) played by `eval_prospector`
through the real replay writer. Screenshots go to pytest's tmp dir (path printed), or to
$JAXRL_VIEW_SCREENSHOTS when set (that is how docs/img/ is made).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
OLD = time.time() - 3600  # mtime of files of runs that are not running


def _write_run(d: Path, lr: float, offset: float, steps: int, result: bool):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"recipe: ppo\nppo:\n  lr: {lr}\n  num_envs: 64\n"
                                   f"loop:\n  steps: {steps}\nrun:\n  seed: 0\n")
    rows = [{"step": s, "loss": 2 * math.exp(-s / 30) + offset + 0.2 * ((s * 7919) % 13) / 13,
             "steps_per_sec": 4.0} for s in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if result:
        (d / "result.json").write_text(json.dumps({
            "updates": steps, "returns": {"ppo": {"mean": 111.9, "median": 114.0},
                                          "market_timer": {"mean": 75.0, "median": 72.9}}}))
        (d / "samples.jsonl").write_text("".join(
            json.dumps({"step": i, "text": f"ROMEO: sample number {i}"}) + "\n" for i in range(60)))
    else:  # preempted: a checkpoint at the last logged step, no result.json
        (d / "checkpoints" / str(steps)).mkdir(parents=True)
    for p in [d, *d.rglob("*")]:
        os.utime(p, (OLD, OLD))


def _make_ppo_eval_run(root: Path) -> Path:
    """A PPO run dir (config + checkpoint of the initial agent) evaluated by eval_prospector,
    which writes its replay: the trained-policy path end to end, on a short episode."""
    import jax

    from jaxrl import launch
    from jaxrl.core.checkpoint import Checkpointer
    from jaxrl.core.config import dump

    ppo_dir = root / "agent"
    module, cfg = launch.load("configs/ppo_prospector.yaml", [
        f"run.dir={ppo_dir}", "ppo.num_envs=2", "ppo.rollout_steps=4", "ppo.minibatches=1",
        "policy.hidden=[8]", "eval.greedy=true", "env.env_impl=native"])
    ppo_dir.mkdir(parents=True)
    (ppo_dir / "config.yaml").write_text(dump(cfg))
    ckpt = Checkpointer(ppo_dir / "checkpoints", async_save=False)
    ckpt.save(1, jax.jit(module.make_ppo(cfg).init)(jax.random.PRNGKey(0)), meta={"step": 1})
    ckpt.close()
    eval_dir = root / "eval"
    module, ecfg = launch.load("configs/eval_prospector.yaml", [
        f"run.dir={eval_dir}", "episodes=1", "max_steps=30", "policies=[]",
        f"ppo_runs=[{ppo_dir}]", "replay_episodes=1", "env_impl=native", "run.seed=5"])
    assert launch.run(module, ecfg) == 0  # writes config.yaml, replays/, result.json
    return eval_dir


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _write_run(root / "sweep" / "lr1e-3", 1e-3, 0.0, 60, result=True)
    _write_run(root / "sweep" / "lr3e-4", 3e-4, 0.6, 50, result=False)
    bad = root / "broken"
    bad.mkdir()
    (bad / "config.yaml").write_text("recipe: ppo\nppo: [unclosed\n")
    (bad / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    for p in bad.iterdir():
        os.utime(p, (OLD, OLD))
    (root / "outside.txt").write_text("secret")
    (root / "sweep" / "lr1e-3" / "replays").mkdir()
    (root / "sweep" / "lr1e-3" / "replays" / "escape.jsonl").symlink_to(root / "outside.txt")
    return root


@pytest.fixture(scope="module")
def eval_future(runs_root):
    """Compiling the PPO eval takes most of this file's time: it runs in a thread alongside the
    browser tests that do not need it (the server discovers run dirs on every request)."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_make_ppo_eval_run, runs_root)


@pytest.fixture(scope="module")
def eval_run(eval_future, runs_root):
    run = eval_future.result()
    (run / "replays" / "future.jsonl").write_text(
        json.dumps({"format": "prospector-replay/2", "seed": 0}) + "\n{}\n")
    return run


@pytest.fixture(scope="module")
def server(runs_root, eval_future):
    cmd = [sys.executable, "-m", "jaxrl.view", str(runs_root / "sweep"), str(runs_root / "broken"),
           str(runs_root / "eval"), str(runs_root / "missing"), "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    assert first and "http://" in first[0], f"no URL printed: {first}"
    url = first[0].split("at ", 1)[1].strip()
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    out = Path(os.environ.get("JAXRL_VIEW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1120, "height": 760})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.set_default_timeout(30_000)
        playwright.expect.set_options(timeout=30_000)  # a loaded 2-core machine compiles slowly
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors: {errors}"


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _open(page, server, hash_):
    page.goto(f"{server}#/{hash_}")


def test_server_binds_loopback_and_prints_its_url(server):
    assert server.startswith("http://127.0.0.1:") and server.endswith("/")
    status, body = _get(server + "api/runs")
    assert status == 200 and {r["id"] for r in body["runs"]} == {
        "sweep/lr1e-3", "sweep/lr3e-4", "broken", "eval", "missing"}


@pytest.mark.parametrize("path", ["../outside.txt", "replays/../../outside.txt", "/etc/passwd",
                                  "%2e%2e/outside.txt", "replays/escape.jsonl", "C:/x"])
def test_paths_outside_the_run_dir_are_refused(server, path):
    query = urllib.parse.urlencode({"run": "sweep/lr1e-3", "path": path}).replace("%252e", "%2e")
    for endpoint in ("api/file", "api/replay"):
        status, body = _get(f"{server}{endpoint}?{query}")
        assert status == 403 and "refused" in body["error"]
    with urllib.request.urlopen(server + "api/file?run=sweep/lr1e-3&path=result.json") as r:
        assert json.loads(r.read())["updates"] == 60
    for escape in ("static/%2e%2e/runs.py", "static/..%2fserver.py"):
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server + escape)


def test_two_runs_overlaid_with_smoothing_and_log_scale(page, server, shots):
    _open(page, server, "curves?runs=sweep/lr1e-3,sweep/lr3e-4&metric=loss")
    for run in ("sweep/lr1e-3", "sweep/lr3e-4"):
        page.wait_for_selector(f'#chart path.smooth[data-run="{run}"]', state="attached")
        raw = page.locator(f'#chart path.raw[data-run="{run}"]')
        assert raw.get_attribute("stroke-opacity") == "0.25"  # the raw line, faint
    smooth = page.locator('#chart path.smooth[data-run="sweep/lr1e-3"]').get_attribute("d")
    assert smooth.count("L") == 59  # one point per logged step
    page.locator("#smoothing").fill("0.95")
    page.wait_for_function(
        f"document.querySelector('#chart path.smooth').getAttribute('d') != {smooth!r}")
    assert page.locator("#smooth-value").inner_text() == "0.95"
    page.screenshot(path=shots / "curves.png")
    page.locator("#smoothing").fill("0")
    page.wait_for_function("!document.querySelector('#chart path.smooth')")
    assert page.locator("#chart path.raw").count() == 2
    page.locator("#logscale").check()
    assert page.locator("#chart path.raw").count() == 2 and "log=1" in page.url
    page.select_option("#xaxis", "time")
    page.wait_for_selector("#chart text >> text=time (s, from steps_per_sec)")


def test_curves_refresh_live_while_a_run_writes(page, server, runs_root):
    _open(page, server, "curves?runs=sweep/lr3e-4&metric=loss&smooth=0")
    legend = page.locator('.legend [data-run="sweep/lr3e-4"]')
    playwright.expect(legend).to_contain_text("(50 points)")
    metrics = runs_root / "sweep" / "lr3e-4" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 51, "loss": 0.7}) + "\n" + '{"step": 52, "lo')
    playwright.expect(legend).to_contain_text("(51 points)", timeout=10_000)
    playwright.expect(page.locator("#curve-warnings")).to_contain_text("line 52 is incomplete")
    with metrics.open("a") as f:
        f.write('ss": 0.69}\n')
    playwright.expect(legend).to_contain_text("(52 points)", timeout=10_000)
    playwright.expect(page.locator("#curve-warnings")).not_to_contain_text("incomplete")
    tmp = metrics.with_suffix(".tmp")  # a resumed run rewrites the file (truncate_after)
    tmp.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 11)))
    os.replace(tmp, metrics)
    playwright.expect(legend).to_contain_text("(10 points)", timeout=10_000)
    with metrics.open("a") as f:
        f.write("".join(json.dumps({"step": s, "loss": 0.7}) + "\n" for s in range(11, 53)))
    playwright.expect(legend).to_contain_text("(52 points)", timeout=10_000)
    (metrics.parent / "checkpoints" / "52").mkdir()  # as SIGTERM leaves it: preempted
    for p in (metrics, metrics.parent / "checkpoints"):
        os.utime(p, (OLD, OLD))


def test_config_diff_shows_only_differing_keys(page, server):
    _open(page, server, "curves?runs=sweep/lr1e-3")
    page.locator("#diff-button").click()
    table = page.locator("#diff-table")
    playwright.expect(table).to_contain_text("ppo.lr")
    keys = table.locator("tr td:first-child").all_inner_texts()
    assert keys == ["loop.steps", "ppo.lr"]  # num_envs, seed, recipe are the same


def test_evaluation_tables_and_searchable_samples(page, server, shots):
    _open(page, server, "evals?run=sweep/lr1e-3")
    table = page.locator('.eval-file[data-path="result.json"] table.matrix')
    playwright.expect(table).to_contain_text("market_timer")
    assert table.locator("tr").nth(0).locator("th").all_inner_texts() == ["", "mean", "median"]
    playwright.expect(page.locator("#sample-count")).to_have_text("60 matching rows")
    page.locator("#sample-search").fill("number 42")
    playwright.expect(page.locator("#sample-count")).to_have_text("1 matching rows")
    playwright.expect(page.locator("#samples")).to_contain_text("ROMEO: sample number 42")
    page.locator("#sample-search").fill("")
    playwright.expect(page.locator("#sample-count")).to_have_text("60 matching rows")
    page.screenshot(path=shots / "evals.png")


def test_human_play_twenty_steps_saved_and_compared_with_a_bot(page, server, runs_root, shots):
    from jaxrl.envs.prospector import replay

    _open(page, server, "play?seed=7&max_steps=40")
    status = page.locator("#play-status")
    playwright.expect(status).to_have_attribute("data-steps", "0")
    assert page.locator("#actions button:disabled").count() > 0  # the mask greys some out
    assert page.locator('#actions button[data-action="66"]').is_disabled()  # refuel when full
    page.locator('#actions button[data-action="0"]').click()  # wait
    page.locator('#actions button[data-action="14"]').click()  # scan sector 1
    for _ in range(8):
        page.keyboard.press("1")  # mine asteroid 0 at power 1
    for key in ["ArrowRight", "ArrowLeft", "x", "s", "f", "r"]:
        page.keyboard.press(key)  # a key whose action the mask forbids is not sent
    page.wait_for_function("document.querySelector('#play-status').dataset.steps >= 3")
    page.wait_for_timeout(500)
    for _ in range(20 - int(status.get_attribute("data-steps"))):
        page.keyboard.press("w")
    playwright.expect(status).to_have_attribute("data-steps", "20")
    page.screenshot(path=shots / "play.png")
    page.select_option("#save-run", "sweep/lr1e-3")
    page.select_option("#save-bot", "greedy_miner")
    page.locator("#save").click()
    playwright.expect(page.locator("#saved")).to_contain_text("saved 20 steps", timeout=30_000)
    playwright.expect(page.locator("#saved")).to_contain_text("greedy_miner on the same seed")
    replays = runs_root / "sweep" / "lr1e-3" / "replays"
    human = sorted(replays.glob("human-seed7-*.jsonl"))
    header, steps = replay.read(human[-1])
    assert header["policy"] == "human" and header["seed"] == 7 and len(steps) == 20
    assert [s["t"] for s in steps] == list(range(1, 21))
    assert [s["action"] for s in steps[:3]] == [0, 14, 25 + 1]
    warps = [s["action"] for s in steps if 1 <= s["action"] <= 12]
    assert warps == [2, 1]  # → then ←: sector 1 and back to 0, each read after the step before
    bot_header, _ = replay.read(replays / "greedy_miner-seed7-T40.jsonl")
    assert bot_header["seed"] == 7
    page.locator("#watch-link").click()
    playwright.expect(page.locator(".player canvas")).to_have_count(2)
    playwright.expect(page.locator("#player")).to_have_attribute("data-total", "40")
    page.locator("#scrub").fill("19")
    playwright.expect(page.locator(".frame-info").nth(1)).to_contain_text("t=20")
    page.screenshot(path=shots / "replays.png")


def test_eval_prospector_plays_a_ppo_run_and_writes_its_replay(eval_run):
    from jaxrl.envs.prospector import replay

    summary = json.loads((eval_run / "result.json").read_text())
    header, steps = replay.read(eval_run / "replays" / "ppo-agent.jsonl")
    assert header["policy"] == "ppo-agent" and header["seed"] == 5 and len(steps) == 30
    # The greedy agent is deterministic: its replay is the evaluated episode.
    assert replay.episode_returns(steps)[0] == pytest.approx(
        summary["policies"]["ppo-agent"]["mean"], abs=1e-4)


def test_replay_plays_to_its_end_streaming_pages(page, server, eval_run, shots):
    _open(page, server, "replays?run=eval&a=replays/ppo-agent.jsonl&page=8")
    player = page.locator("#player")
    playwright.expect(player).to_have_attribute("data-total", "30")
    page.locator("#forward").click()
    playwright.expect(player).to_have_attribute("data-index", "1")
    page.select_option("#speed", "200")
    page.locator("#play").click()
    playwright.expect(player).to_have_attribute("data-state", "ended", timeout=20_000)
    assert player.get_attribute("data-index") == "29"
    assert int(player.get_attribute("data-ws")) >= 3  # pages 2..4 came over the websocket
    assert page.locator(".frame-info").inner_text().startswith("episode 0 t=30 action")
    drawn = page.evaluate("""() => { const c = document.querySelector('.player canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const colours = new Set();
        for (let i = 0; i < d.length; i += 4) colours.add(d[i] << 16 | d[i+1] << 8 | d[i+2]);
        return colours.size; }""")
    assert drawn > 20  # ring, asteroids, gauges, text: not a blank canvas
    page.locator("#scrub").fill("10")
    playwright.expect(player).to_have_attribute("data-index", "10")
    _open(page, server, "replays?run=eval&a=replays/future.jsonl")
    playwright.expect(page.locator("#message")).to_contain_text(
        "replay format prospector-replay/2 is newer than this jaxrl reads")


def test_runs_page_shows_status_and_bad_dirs_readably(page, server, eval_run, shots):
    _open(page, server, "runs")
    rows = page.locator("#runs-table")
    playwright.expect(rows).to_contain_text("directory not found")
    status = {r: page.locator(f'#runs-table tr[data-run="{r}"] .status').inner_text()
              for r in ("sweep/lr1e-3", "sweep/lr3e-4", "broken", "eval", "missing")}
    assert status == {"sweep/lr1e-3": "finished", "sweep/lr3e-4": "preempted", "broken": "failed",
                      "eval": "finished", "missing": "bad"}
    broken = page.locator('#runs-table tr[data-run="broken"]')
    playwright.expect(broken).to_contain_text("config.yaml is not valid YAML")
    playwright.expect(broken).to_contain_text("line 2 is not valid JSON")
    page.screenshot(path=shots / "runs.png")
    broken.click()
    playwright.expect(page.locator("#run-detail")).to_contain_text("config.yaml is not valid YAML")
    _open(page, server, "curves?runs=missing")  # a bad run dir opened directly
    page.wait_for_selector("#chart text")
    _open(page, server, "evals?run=missing")
    playwright.expect(page.locator("#message")).to_contain_text("directory not found")
    assert "Traceback" not in page.content()
    assert _get(server + "api/runs")[0] == 200  # the server is still up
    _open(page, server, "runs?filter=loss<0.5")  # filter by a last metric
    playwright.expect(page.locator("#runs-table tr[data-run]")).to_have_count(1)
    assert page.locator("#runs-table tr[data-run]").get_attribute("data-run") == "sweep/lr1e-3"
