"""Runs inside the sandbox: execute one candidate program plus its tests, report one verdict.

Reads a JSON job from stdin ({"program", "test", "kind", "nonce", "site_packages",
"isolated_pids"}), so the untrusted code never sees the job, and writes exactly one verdict line
`<nonce>{"passed": ..., "reason": ..., "tests": n, "failures": m}` to a duplicate of the original
stdout. The parent trusts only a verdict carrying its nonce, so exiting early (`sys.exit`,
`os._exit`, a crash) can never look like a pass. Standard library only: this file is not
imported from the jaxrl package.
"""

import builtins
import io
import json
import os
import sys


def _snapshot(with_unittest):
    """Identities of the machinery a candidate could monkeypatch to fake a pass."""
    state = {"builtins": dict(vars(builtins)), "sys.exit": sys.exit, "os._exit": os._exit}
    if with_unittest:  # imported only when needed: it costs ~40 ms of a ~100 ms run
        import unittest

        for cls in (unittest.TestCase, unittest.TestResult, unittest.TestSuite, unittest.TestLoader):
            state[cls.__name__] = dict(vars(cls))
    return state


def _tampered(before):
    now = _snapshot("TestCase" in before)
    for name, value in before.items():
        if isinstance(value, dict):
            changed = [k for k, v in value.items() if now[name].get(k, object()) is not v]
            if changed:
                return f"{name}.{changed[0]}"
        elif now[name] is not value:
            return name
    return None


def _leftover_processes():
    """PIDs other than ours and our ancestors (valid only inside our own PID namespace)."""
    ancestors, pid = set(), os.getpid()
    while pid > 1:
        ancestors.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    ancestors.add(1)
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in ancestors)


def _run(job, verdict):
    before = _snapshot(job["kind"] == "unittest")
    namespace = {
        "__name__": "__candidate__",
        "__file__": os.path.join(os.getcwd(), "solution.py"),
        "__builtins__": builtins,
    }
    try:
        exec(compile(job["program"], "solution.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the tests never ran
        return verdict(False, f"solution raised {type(e).__name__}: {e}"[:500])
    try:
        exec(compile(job["test"], "test.py", "exec"), namespace)
        if job["kind"] == "unittest":
            import unittest

            loader = unittest.TestLoader()
            suite = unittest.TestSuite(
                loader.loadTestsFromTestCase(namespace[name]) for name in job["test_classes"]
            )
            result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
            tests, failures = result.testsRun, len(result.failures) + len(result.errors)
            problems = result.failures + result.errors
            first = problems[0][1].strip().splitlines()[-1] if problems else ""
        else:
            tests, failures, first = 1, 0, ""
    except BaseException as e:  # noqa: BLE001
        return verdict(False, f"test raised {type(e).__name__}: {e}"[:500], 1, 1)
    tampered = _tampered(before)
    if tampered:
        return verdict(False, f"tampered with the test machinery ({tampered})", tests, tests)
    if job.get("isolated_pids"):
        leftover = _leftover_processes()
        if leftover:
            return verdict(False, f"left {len(leftover)} background process(es) running", tests, failures)
    if tests == 0:
        return verdict(False, "no tests ran", 0, 0)
    if failures:
        return verdict(False, f"{failures}/{tests} tests failed: {first}"[:500], tests, failures)
    return verdict(True, "passed", tests, 0)


def main():
    job = json.loads(sys.stdin.read())
    sys.stdin = io.StringIO()  # a candidate calling input() must not block
    sys.path.append(job["site_packages"])  # interpreter runs with -S for a fast start
    sys.path.insert(0, os.getcwd())
    sys.setrecursionlimit(job.get("recursion_limit", 3000))
    verdict_fd = os.dup(1)
    nonce = job.pop("nonce")
    write, exit_now = os.write, os._exit

    def verdict(passed, reason, tests=0, failures=0):
        line = json.dumps({"passed": passed, "reason": reason, "tests": tests, "failures": failures})
        write(verdict_fd, f"\n{nonce}{line}\n".encode())
        exit_now(0)  # do not wait for threads the candidate left behind

    _run(job, verdict)


if __name__ == "__main__":
    main()
