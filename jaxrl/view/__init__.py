"""The local run browser: `python -m jaxrl.view RUN_DIR [RUN_DIR ...] [--port P] [--host H]`.

Pages: runs, curves (overlay, smoothing, log scale, live refresh, config diff), evaluations,
Prospector replays and human play. Reads run directories only (plus the replays human play
saves into one). See README.md, "Run browser".
"""
