"""Runs inside the sandbox: compile an RTL candidate with Icarus, then run its cocotb tests.

Reads a JSON job from stdin and prints one nonce-tagged line per finished stage, so a
simulation that hangs (and is killed by the parent's wall timeout) still leaves the syntax
verdict behind. `cocotb_tools.runner` has no timeout of its own; the sandbox supplies it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def main():
    job = json.loads(sys.stdin.read())
    nonce = job.pop("nonce")
    verdict_fd = os.dup(1)

    def report(stage, **fields):
        os.write(verdict_fd, f"\n{nonce}{json.dumps({'stage': stage, **fields})}\n".encode())

    build_dir = Path(job["build_dir"])
    build_dir.mkdir(parents=True, exist_ok=True)
    compile_ = subprocess.run(
        ["iverilog", "-g2012", "-o", str(build_dir / "syntax.vvp"), "-s", job["toplevel"], *job["sources"]],
        capture_output=True,
        text=True,
    )
    if compile_.returncode != 0:
        report("syntax", ok=False, log=(compile_.stderr or compile_.stdout)[-2000:])
        return
    report("syntax", ok=True)
    if job.get("harness") == "pytest":
        run_harness_pytest(job, build_dir, report)
        return

    from cocotb_tools.runner import get_results, get_runner

    runner = get_runner("icarus")
    runner.build(
        sources=job["sources"],
        hdl_toplevel=job["toplevel"],
        parameters=job.get("parameters", {}),
        always=True,
        build_dir=build_dir,
        timescale=("1ns", "1ns"),
        log_file=build_dir / "build.log",
    )
    results_xml = build_dir / "results.xml"  # absolute: the runner rejects relative paths
    try:
        runner.test(
            test_module=job["module"],
            hdl_toplevel=job["toplevel"],
            build_dir=build_dir,
            test_dir=job["test_dir"],
            results_xml=str(results_xml),
            extra_env=job.get("env", {}),
            log_file=build_dir / "sim.log",
        )
    except BaseException as e:  # noqa: BLE001 - a failing test raises here; results.xml decides
        if not results_xml.exists():
            tail = (build_dir / "sim.log").read_text()[-1500:] if (build_dir / "sim.log").exists() else ""
            report("tests", tests=0, failed=0, log=f"{type(e).__name__}: {e}\n{tail}")
            return
    tests, failed = get_results(results_xml)
    log = (build_dir / "sim.log").read_text()[-1500:] if failed and (build_dir / "sim.log").exists() else ""
    report("tests", tests=tests, failed=failed, log=log)


def run_harness_pytest(job, build_dir, report):
    """CVDP's own entry point: pytest on the harness's test_runner.py; one test per pytest case."""
    import xml.etree.ElementTree as ET

    junit = build_dir / "pytest.xml"
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
         str(Path(job["test_dir"]) / "test_runner.py")],
        cwd=run_dir, env={**env, **job.get("env", {})}, capture_output=True, text=True,
    )
    if not junit.exists():
        report("tests", tests=0, failed=0, log=(proc.stdout + proc.stderr)[-1500:])
        return
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = int(suite.get("tests", 0)) - int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    report("tests", tests=tests, failed=failed, log=proc.stdout[-1500:] if failed else "")


if __name__ == "__main__":
    main()
