"""The sandbox against hostile candidates: each attack fails the sample, the host is untouched,
and no forgery (operators, patched builtins or unittest, early exits) turns a wrong answer into a pass."""

import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from jaxrl.eval.grading import PythonGrader
from jaxrl.eval.sandbox import Limits, Sandbox, SandboxUnavailable
from jaxrl.eval.tasks import CodeTask

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")

# `add` is correct in every attack below unless the attack itself breaks it, so only the sandbox
# and the harness stand between the attack and a pass.
TASK = CodeTask(
    task_id="adversarial/add",
    prompt="def add(a, b):\n",
    entry_point="add",
    test="def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n",
    reference="def add(a, b):\n    return a + b\n",
)
UNITTEST_TASK = CodeTask(
    task_id="adversarial/add_unittest",
    prompt="",
    entry_point="add",
    test=(
        "import unittest\n\nclass AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
    ),
    reference="def add(a, b):\n    return a + b\n",
    kind="unittest",
    test_classes=("AddTest",),
)
# Graded by `abs(result - expected) < tol`, so a forged `__sub__` is what would fake a pass.
FLOAT_TASK = CodeTask(
    task_id="adversarial/add_float",
    prompt="",
    entry_point="add",
    test="def check(candidate):\n    assert abs(candidate(2.0, 3.5) - 5.5) < 1e-9\n\ncheck(add)\n",
    reference="def add(a, b):\n    return a + b\n",
)
PAIR_TASK = CodeTask(
    task_id="adversarial/pair",
    prompt="",
    entry_point="pair",
    test="assert pair(2, 3) == [2, 3]\n",
    reference="def pair(a, b):\n    return [a, b]\n",
)
LIMITS = Limits(wall_seconds=5.0, cpu_seconds=2, memory_bytes=512 << 20, output_bytes=1 << 16)


@pytest.fixture(scope="module")
def grader():
    grader = PythonGrader(Sandbox("bwrap"), limits=LIMITS, workers=2, cache=False)
    yield grader
    grader.close()


@pytest.fixture()
def outside(tmp_path_factory):
    """A file outside the sandbox that attacks try to change; /var/tmp is not masked by bwrap."""
    root = Path(tempfile.mkdtemp(prefix="jaxrl-canary-", dir="/var/tmp"))
    canary = root / "canary.txt"
    canary.write_text("untouched")
    yield canary
    shutil.rmtree(root, ignore_errors=True)


def _home_file() -> Path | None:
    home = Path.home()
    files = [p for p in home.iterdir() if p.is_file()] if home.is_dir() else []
    return files[0] if files else None


ATTACKS = {
    "infinite_loop": ("while True:\n    pass\n", "time"),
    "busy_thread": (
        # A spin that allocates nothing: a growing list hit the memory limit in ~1 s on a fast
        # CPU, the thread died of MemoryError, join returned and the sample passed.
        "import threading\n"
        "def spin():\n    while True:\n        pass\n"
        "def add(a, b):\n    t = threading.Thread(target=spin)\n"
        "    t.start(); t.join()\n    return a + b\n",
        "time",
    ),
    "fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "",
    ),
    "memory_hog": ("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n", "MemoryError"),
    "giant_output": ("while True:\n    print('x' * 4096)\n", "output limit"),
    "network": (
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n"
        "def add(a, b):\n    return a + b\n",
        "OSError",
    ),
    "kill_parent": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
        "def add(a, b):\n    return a - b\n",
        "AssertionError",
    ),
    "exit_before_asserts": ("import sys\nsys.exit(0)\n", "SystemExit"),
    "os_exit_before_asserts": ("import os\nos._exit(0)\n", "exited (code 0)"),
    "patch_exit_and_asserts": (
        "import builtins, sys\nbuiltins.AssertionError = type('Never', (Exception,), {})\n"
        "sys.exit = lambda *a: None\ndef add(a, b):\n    return 0\n",
        "",
    ),
    "background_process": (
        "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "def add(a, b):\n    return a + b\n",
        "background process",
    ),
    "deep_recursion": ("def add(a, b):\n    return add(a, b)\n", "RecursionError"),
    "c_stack_overflow": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef add(a, b):\n    return add(a, b)\n",
        "",
    ),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "segmentation fault"),
    "sleep_past_timeout": ("import time\ntime.sleep(60)\n", "timed out"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_fails_sample_and_harness_survives(grader, name):
    code, expected_reason = ATTACKS[name]
    start = time.monotonic()
    result = grader.grade(TASK, code)
    assert not result.passed, f"{name} passed: {result}"
    assert result.reason, name
    assert expected_reason in result.reason, f"{name}: unexpected reason {result.reason!r}"
    assert time.monotonic() - start < LIMITS.wall_seconds + 3
    # The harness still grades a correct solution afterwards.
    assert grader.grade(TASK, TASK.reference).passed


def test_writes_and_deletes_outside_workdir_fail_and_change_nothing(grader, outside):
    for code in (
        f"open({str(outside)!r}, 'w').write('pwned')\n",
        f"import os\nos.remove({str(outside)!r})\n",
        "open('/etc/jaxrl-pwned', 'w').write('x')\n",
    ):
        result = grader.grade(TASK, code + TASK.reference)
        assert not result.passed and "OSError" in result.reason, result
    assert outside.read_text() == "untouched"
    assert not Path("/etc/jaxrl-pwned").exists()


def test_workdir_is_writable_and_fresh(grader):
    write = "open('scratch.txt', 'a').write('x')\nassert open('scratch.txt').read() == 'x'\n"
    assert grader.grade(TASK, write + TASK.reference).passed
    assert grader.grade(TASK, write + TASK.reference + "\n").passed  # a second run starts clean


def test_home_directory_is_hidden(grader):
    secret = _home_file()
    if secret is None:
        pytest.skip("no file in the home directory to try to read")
    result = grader.grade(TASK, f"print(open({str(secret)!r}).read())\n" + TASK.reference)
    assert not result.passed and "FileNotFoundError" in result.reason, result


def _code(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


ALWAYS_EQUAL = _code("""
    class Same:
        def __eq__(self, other):
            return True
        __ne__ = lambda self, other: False
""")
ALWAYS_EQUAL_INT = ALWAYS_EQUAL.replace("class Same:", "class Same(int):")
PROMPT_HELPER_TASK = CodeTask(
    task_id="adversarial/prompt_helper",
    prompt="",
    entry_point="half",
    prefix="def double(x):\n    return 2 * x\n\n",
    test="assert half(double(7)) == 7\n",
    reference="def half(x):\n    return x // 2\n",
)
CALLBACK_TASK = CodeTask(  # like MBPP/861 and /864, the test hands the candidate a lambda
    task_id="adversarial/apply",
    prompt="",
    entry_point="apply",
    test="assert apply(lambda x: x + 1, 2) == 3\n",
    reference="def apply(f, x):\n    return f(x)\n",
)
# Each forgery returns a wrong answer (0, or an object standing in for one) and hides it; each
# passed under the previous harness or would pass without one of its defences.
FORGERIES = {
    "eq_always_true": (TASK, ALWAYS_EQUAL + "def add(a, b):\n    return Same()\n", "forged comparison: Same.__eq__"),
    "int_subclass_eq": (TASK, ALWAYS_EQUAL_INT + "def add(a, b):\n    return Same(0)\n", "forged comparison"),
    "borrowed_c_operator": (TASK, _code("""
        class Same(int):
            __eq__ = int.__ne__
        def add(a, b):
            return Same(0)
    """), "forged comparison: Same.__eq__"),
    "metaclass_disguise": (TASK, _code("""
        class Meta(type):  # claims to equal int, to pass for a plain type in a set lookup
            __eq__ = lambda cls, other: True
            __hash__ = lambda cls: hash(int)
        class Same(metaclass=Meta):
            __eq__ = lambda self, other: True
        def add(a, b):
            return Same()
    """), "forged comparison: Same.__eq__"),
    "forged_list_elements": (PAIR_TASK, ALWAYS_EQUAL + "def pair(a, b):\n    return [Same(), Same()]\n",
                             "forged comparison"),
    "forged_sub": (FLOAT_TASK, _code("""
        class Zero:
            __sub__ = lambda self, other: 0.0
        def add(a, b):
            return Zero()
    """), "forged comparison: Zero.__sub__"),
    "patch_builtins_abs": (FLOAT_TASK, _code("""
        import builtins
        builtins.abs = lambda x: 0
        def add(a, b):
            return 0.0
    """), "tampered with the test machinery (builtins.abs)"),
    "patch_builtins_isinstance_in_call": (TASK, _code("""
        import builtins
        def add(a, b):
            builtins.isinstance = lambda *a: True
            return a + b
    """), "tampered with the test machinery (builtins.isinstance)"),
    "patch_verdict_encoder": (TASK, _code("""
        import json
        json.dumps = lambda *a, **k: '{"passed": true, "reason": "passed", "tests": 1, "failures": 0}'
        def add(a, b):
            return 0
    """), "tampered with the test machinery (json.dumps)"),
    "patch_harness_via_main": (FLOAT_TASK, _code("""
        import __main__, builtins
        __main__._tampered = lambda before: None
        builtins.abs = lambda x: 0
        def add(a, b):
            return 0.0
    """), "tampered with the test machinery (builtins.abs)"),
    "redefine_prompt_helper": (PROMPT_HELPER_TASK, _code("""
        def half(x):
            return x
        double = half  # the test's helper now agrees with a wrong half
    """), "AssertionError"),
    "replace_operator_check_via_callback": (CALLBACK_TASK, _code("""
        def apply(f, x):
            f.__globals__['__jaxrl_operate__'] = lambda op, a, b: True
            return 0
    """), "tampered with the test machinery (the tests' operator check)"),
    "sys_exit_in_call": (TASK, "import sys\ndef add(a, b):\n    sys.exit(0)\n", "SystemExit"),
    "raise_system_exit": (TASK, "raise SystemExit(0)\n", "SystemExit"),
    "os_exit_in_call": (TASK, "import os\ndef add(a, b):\n    os._exit(0)\n", "exited (code 0)"),
    "kill_self_in_call": (TASK, _code("""
        import os, signal
        def add(a, b):
            os.kill(os.getpid(), signal.SIGKILL)
    """), "SIGKILL"),
    "unittest_eq_forged": (UNITTEST_TASK, ALWAYS_EQUAL_INT + "def add(a, b):\n    return Same(0)\n",
                           "forged comparison"),
    "unittest_assert_patched": (UNITTEST_TASK, _code("""
        import unittest
        unittest.TestCase.assertEqual = lambda self, *a, **k: None
        def add(a, b):
            return 0
    """), "AssertionError: 0 != 5"),
    "unittest_assert_patched_then_restored": (UNITTEST_TASK, _code("""
        import unittest
        original = unittest.TestCase.assertEqual
        class Restore:
            def __del__(self):
                unittest.TestCase.assertEqual = original
        unittest.TestCase.assertEqual = lambda self, *a, **k: None
        def add(a, b, _restore=[Restore()]):
            _restore.clear()
            return 0
    """), "AssertionError: 0 != 5"),
    "unittest_runner_patched": (UNITTEST_TASK, _code("""
        import unittest
        unittest.TestResult.wasSuccessful = lambda self: True
        unittest.TextTestRunner.run = lambda self, test: unittest.TestResult()
        def add(a, b):
            return 0
    """), "AssertionError: 0 != 5"),
    "unittest_exc_info_patched": (UNITTEST_TASK, _code("""
        import sys
        def add(a, b):
            sys.exc_info = lambda: (None, None, None)
            return 0
    """), "tampered with the test machinery (sys.exc_info)"),
    "unittest_skip_from_solution": (UNITTEST_TASK, _code("""
        import unittest
        def add(a, b):
            raise unittest.SkipTest('skip me')
    """), "SkipTest: skip me"),
    "unittest_sys_exit_in_test": (UNITTEST_TASK, "import sys\ndef add(a, b):\n    sys.exit(0)\n", "SystemExit"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_pass_fails_with_a_reason(grader, name):
    task, code, expected_reason = FORGERIES[name]
    result = grader.grade(task, code)
    assert not result.passed, f"{name} passed: {result}"
    assert expected_reason in result.reason, f"{name}: unexpected reason {result.reason!r}"
    assert grader.grade(task, task.reference).passed


def test_operators_under_test_and_stdlib_results_still_pass(grader):
    """The forgery check must not fail honest code: a class's own `__contains__` and `__eq__`
    compared with its own instances, stdlib values (Counter, datetime, Decimal), namedtuples."""
    task = CodeTask(
        task_id="adversarial/honest_operators",
        prompt="",
        entry_point="Bag",
        test=_code("""
            import unittest, collections, datetime, decimal

            class BagTest(unittest.TestCase):
                def test_bag(self):
                    bag = Bag(['a', 'a'])
                    self.assertIn('a', bag)
                    self.assertNotIn('b', bag)
                    assert 'a' in bag
                    self.assertEqual(bag, Bag(['a', 'a']))
                    self.assertEqual(bag.counts(), {'a': 2})
                    assert bag.counts() == collections.Counter('aa')
                    self.assertEqual(bag.when(), datetime.date(2024, 1, 2))
                    self.assertAlmostEqual(bag.price(), decimal.Decimal('1.5'))
                    self.assertEqual(bag.point(), (1, 2))
        """),
        reference=_code("""
            import collections, datetime, decimal
            Point = collections.namedtuple('Point', 'x y')

            class Bag:
                def __init__(self, items):
                    self.items = list(items)
                def __contains__(self, item):
                    return item in self.items
                def __eq__(self, other):
                    return isinstance(other, Bag) and self.items == other.items
                def counts(self):
                    return collections.Counter(self.items)
                def when(self):
                    return datetime.date(2024, 1, 2)
                def price(self):
                    return decimal.Decimal('1.5')
                def point(self):
                    return Point(1, 2)
        """),
        kind="unittest",
        test_classes=("BagTest",),
    )
    result = grader.grade(task, task.reference)
    assert result.passed and result.tests == 1, result


def test_no_leftover_processes_after_background_attack(grader):
    grader.grade(TASK, "import subprocess\nsubprocess.Popen(['sleep', '123.456'])\n" + TASK.reference)
    time.sleep(0.2)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "123.456" in Path(f"/proc/{pid}/cmdline").read_text():
                leftovers.append(pid)
        except OSError:
            pass
    assert not leftovers


def test_process_mode_only_on_request_and_says_so(capsys):
    sandbox = Sandbox("process", Limits(wall_seconds=2.0))
    assert "NOT a sandbox" in sandbox.describe()
    result = sandbox.run(["sh", "-c", "sleep 30"])
    assert result.timed_out and "timed out" in result.failure
    with pytest.raises(ValueError, match="unknown sandbox mode"):
        Sandbox("docker")


def test_missing_bwrap_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else f"/usr/bin/{name}")
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        Sandbox("bwrap")
