"""`python -m jaxrl.view RUN_DIR [RUN_DIR ...] [--port P] [--host 127.0.0.1]`."""

from __future__ import annotations

import argparse
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxrl.view",
        description="Browse run directories: runs, curves, evaluations, Prospector replays, "
                    "human play. A directory that is not a run is searched for runs below it.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="default 127.0.0.1: only this machine (use ssh -L from elsewhere)")
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from jaxrl.view.server import create_app
    except ImportError as e:
        print(f"error: {e.name} is missing; install the viewer's extra: pip install -e '.[view]'",
              file=sys.stderr)
        return 2
    # Bind here so the printed URL carries the real port (also for --port 0).
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror}; try --port 0",
              file=sys.stderr)
        return 2
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"jaxrl.view: serving {len(args.runs)} path(s) at http://{host}:{port}/", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this host can read these "
              "runs and play; there is no login (ssh -L to a 127.0.0.1 server is safer)",
              file=sys.stderr)
    config = uvicorn.Config(create_app(args.runs), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
