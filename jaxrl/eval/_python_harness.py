"""Runs inside the sandbox: execute one candidate program plus its tests, report one verdict.

Reads a JSON job from stdin ({"program", "prefix", "entry_point", "test", "kind",
"test_classes", "nonce", "site_packages", "isolated_pids"}), so the untrusted code never sees the
job, and writes exactly one verdict line `<nonce>{"passed": ..., "reason": ..., "tests": n,
"failures": m}` to a duplicate of the original stdout. Standard library only: not imported from
the jaxrl package.

The candidate runs in this interpreter, so whatever decides the verdict is fixed before it runs:
- The tests are parsed and compiled first, with every comparison and arithmetic operation routed
  through `_operate`, which refuses to let a value whose operators are Python code (a forged
  `__eq__`, `__sub__`, ...) meet a plain value such as an expected literal.
- This file and the tests use a private copy of builtins, and unittest tests a private copy of
  the unittest package loaded outside `sys.modules`, whose comparing asserts go through the same
  check. The tests run in a copy of the candidate's globals, so the candidate cannot rebind the
  names they use, with the names the task's own prefix defines (HumanEval's prompt helpers such
  as `poly`, ClassEval's imports) taken from a run of the prefix alone, so a completion that
  redefines them does not change what the tests call. `import __main__` finds an empty module.
- Every function, class, descriptor and module reachable from a loaded module (the private
  unittest included), and every member of the classes they define, is recorded; a change found
  after the program ran or after the tests fails the sample.
- A pass is counted, never inferred from the absence of a failure: the verdict is written last,
  with C functions captured at start and a nonce the candidate never sees, so exiting early or
  crashing can only fail.
Not defended: code that walks frames, function internals (`__globals__` of a test function it is
handed), the garbage collector, `/proc/self/mem` or ctypes to reach this file's private objects
(see jaxrl/eval/README.md).
"""

import builtins

__builtins__ = dict(vars(builtins))  # functions below resolve builtins here: patching `builtins` misses them

import ast  # noqa: E402 - after the private builtins on purpose
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import operator  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from _json import encode_basestring_ascii as _quote  # noqa: E402 - C: no module globals to patch
from collections import Counter, deque  # noqa: E402
from os import _exit, dup, getcwd, getpid, listdir, write  # noqa: E402

_real_import = builtins.__import__
_MODULES = sys.modules  # the import system's own dict, whatever `sys.modules` is rebound to
_type_dict = type.__dict__["__dict__"].__get__  # immune to a metaclass overriding __dict__/__mro__
_type_mro = type.__dict__["__mro__"].__get__
_type_flags = type.__dict__["__flags__"].__get__
_type_name = type.__dict__["__name__"].__get__
_HEAPTYPE = 1 << 9
# Types are looked up by id: `cls in a_set` would run a candidate metaclass's __hash__/__eq__.
_C_CALLABLES = frozenset(
    map(id, (type(object.__eq__), type(list.append), type(len), type(dict.__dict__["fromkeys"])))
)
_EXACT = frozenset(
    map(id, (type(None), bool, int, float, complex, str, bytes, range, type(...), type(NotImplemented)))
)
# The operators that receive the test's value, so a forged one can agree with any expected answer.
# Unary ones (`__neg__`, `__float__`, `__bool__`, `__len__`, `__hash__`) cannot see it.
_OPERATORS = (
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__contains__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__matmul__", "__rmatmul__",
    "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__",
    "__pow__", "__rpow__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
    "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__",
)  # fmt: skip
_OPS = {
    "Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le,
    "Gt": operator.gt, "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
    "Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "Div": operator.truediv,
    "FloorDiv": operator.floordiv, "Mod": operator.mod, "Pow": operator.pow,
    "LShift": operator.lshift, "RShift": operator.rshift, "BitOr": operator.or_,
    "BitXor": operator.xor, "BitAnd": operator.and_, "MatMult": operator.matmul,
}  # fmt: skip
_OP = "__jaxrl_operate__"
_forged = []  # reasons; read by the verdict whatever the test code did with the exception


class ForgedComparison(Exception):
    """A value with Python-level operators met a plain value in a test's comparison."""


def _python_operator(cls, cache):
    """The first operator `cls` implements in Python code (which a candidate can write), or None."""
    if id(cls) in cache:
        return cache[id(cls)]
    found = None
    for name in _OPERATORS:
        for klass in _type_mro(cls):
            attrs = _type_dict(klass)
            if attrs is not None and name in attrs:
                attr = attrs[name]
                if attr is not None and (id(type(attr)) not in _C_CALLABLES or attr.__name__ != name):
                    found = f"{_type_name(cls)}.{name}"
                break
        if found:
            break
    if not _type_flags(cls) & _HEAPTYPE:  # static (C) types cannot change: cache across calls
        _STATIC_CACHE[id(cls)] = found
    cache[id(cls)] = found
    return found


_STATIC_CACHE = {}  # id(static type) -> _python_operator's answer


def _forgery(value, limit=1_000_000):
    """Where `value` carries Python-level operators (itself or nested in containers), or None.

    Walks the builtin containers (and deque, Counter) through their C methods, so no candidate
    code runs; a value of more than `limit` objects is trusted past that point.
    """
    cache, seen, stack = dict(_STATIC_CACHE), set(), [value]
    while stack and limit > 0:
        limit -= 1
        x = stack.pop()
        cls = type(x)
        if id(cls) in _EXACT or id(x) in seen:
            continue
        seen.add(id(x))
        if cls is Counter:  # stdlib, Python __eq__ over its dict items
            stack.extend(dict.keys(x))
            stack.extend(dict.values(x))
            continue
        found = _python_operator(cls, cache)
        if found:
            return found
        if issubclass(cls, dict):
            stack.extend(dict.keys(x))
            stack.extend(dict.values(x))
        elif issubclass(cls, (list, tuple, set, frozenset, deque)):
            base = next(b for b in (list, tuple, set, frozenset, deque) if issubclass(cls, b))
            stack.extend(base.__iter__(x))
    return None


def _check_pair(a, b, container=False):
    """Refuse `a` meeting `b` when exactly one of them carries Python-level operators.

    With `container`, `b` is what `a` is looked up in: a container class of the candidate's own
    (its `__contains__` is the behaviour under test) is allowed; forged items inside are not.
    """
    if container and _python_operator(type(b), dict(_STATIC_CACHE)):
        return
    fa, fb = _forgery(a), _forgery(b)
    if (fa is None) != (fb is None):
        reason = (
            f"forged comparison: {fa or fb} is Python code, compared with a plain "
            f"{_type_name(type(b if fa else a))}"
        )
        _forged.append(reason)
        raise ForgedComparison(reason)


def _operate(op, a, b):
    """`a <op> b` for the tests, refused when only one side's operators are Python code."""
    _check_pair(a, b, container=op in ("In", "NotIn"))
    return _OPS[op](a, b)


class _RouteOperators(ast.NodeTransformer):
    """Rewrites `a == b`, `a - b`, ... in test code into `_operate("Eq", a, b)` calls."""

    def __init__(self):
        self.temps = 0

    def _call(self, op, left, right):
        return ast.Call(ast.Name(_OP, ast.Load()), [ast.Constant(op), left, right], [])

    def visit_BinOp(self, node):
        self.generic_visit(node)
        return ast.copy_location(self._call(type(node.op).__name__, node.left, node.right), node)

    def visit_Compare(self, node):
        self.generic_visit(node)
        operands, links = [node.left, *node.comparators], []
        for i, op in enumerate(node.ops):
            left, right = operands[i], operands[i + 1]
            if i + 1 < len(node.ops):  # evaluated once, reused by the next link of the chain
                self.temps += 1
                name = f"__jaxrl_t{self.temps}__"
                right = ast.NamedExpr(ast.Name(name, ast.Store()), right)
                operands[i + 1] = ast.Name(name, ast.Load())
            if isinstance(op, (ast.Is, ast.IsNot)):  # identity runs no candidate code
                links.append(ast.Compare(left, [op], [right]))
            else:
                links.append(self._call(type(op).__name__, left, right))
        result = links[0] if len(links) == 1 else ast.BoolOp(ast.And(), links)
        return ast.copy_location(result, node)


def _compile_test(source):
    tree = _RouteOperators().visit(ast.parse(source, "test.py"))
    return compile(ast.fix_missing_locations(tree), "test.py", "exec")


def _imported_modules(source):
    tree = ast.parse(source, "test.py")
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


_private = {}  # name -> module: the tests' own unittest, never in sys.modules
_TEST_BUILTINS = dict(__builtins__)


def _private_module(name):
    """Load `name` (a part of unittest) afresh, its functions bound to the private builtins."""
    if name in _private:
        return _private[name]
    parent, _, child = name.rpartition(".")
    path = _private_module(parent).__path__ if parent else None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    module.__builtins__ = _TEST_BUILTINS
    _private[name] = module
    spec.loader.exec_module(module)
    if parent:
        setattr(_private[parent], child, module)
    return module


def _test_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level:
        package = globals["__package__"] if globals.get("__package__") else globals["__name__"]
        base = package.rsplit(".", level - 1)[0]
        name = f"{base}.{name}" if name else base
    if name.partition(".")[0] != "unittest":
        return _real_import(name, globals, locals, fromlist, 0)
    module = _private_module(name)
    if not fromlist:
        return _private[name.partition(".")[0]]
    for item in fromlist:
        if item != "*" and not hasattr(module, item) and hasattr(module, "__path__"):
            try:
                _private_module(f"{name}.{item}")
            except ModuleNotFoundError:
                pass
    return module


_TEST_BUILTINS["__import__"] = _test_import


def _guard_asserts(testcase):
    """Route the private TestCase's comparing asserts (assertEqual, assertIn, ...) through the check."""

    def guarded(method, membership):
        def check_then_assert(self, *args, **kwargs):
            options = ("msg", "places", "delta", "seq_type")
            values = [*args, *(v for k, v in kwargs.items() if k not in options)]
            if len(values) >= 2:
                _check_pair(values[0], values[1], container=membership)
            return method(self, *args, **kwargs)

        return check_then_assert

    for name, method in list(vars(testcase).items()):
        if (
            name.startswith(("assert", "fail"))
            and "Is" not in name
            and any(word in name for word in ("Equal", "Greater", "Less", "In", "Subset"))
        ):
            setattr(testcase, name, guarded(method, name in ("assertIn", "assertNotIn")))


def _is_machinery(value):
    """Functions, classes, descriptors and modules: what a patch that fakes a pass replaces.

    Data attributes (`time.tzname`, `sys.path`, caches) change legitimately and are left out.
    """
    cls = type(value)
    try:
        return callable(value) or issubclass(cls, types.ModuleType) or hasattr(cls, "__get__")
    except Exception:  # noqa: BLE001 - an odd attribute is data, not machinery
        return False


def _all_modules():
    """sys.modules, and the tests' private unittest under `private:` names."""
    return [*_MODULES.items(), *((f"private:{name}", module) for name, module in _private.items())]


def _snapshot():
    """Identity of every module's machinery, and of the members of the classes modules define."""
    state = {}
    for mname, module in _all_modules():
        state[(mname,)] = module
        attrs = getattr(module, "__dict__", None)
        if type(attrs) is not dict:
            continue
        for key, value in list(attrs.items()):
            if not _is_machinery(value):
                continue
            state[(mname, key)] = value
            members = _type_dict(value) if issubclass(type(value), type) else None  # None: not ready
            if members is not None and members.get("__module__") == mname.removeprefix("private:"):
                for attr, member in list(members.items()):
                    if _is_machinery(member):
                        state[(mname, key, attr)] = member
    state[("builtins",)] = dict(vars(builtins))
    state[("test builtins",)] = dict(_TEST_BUILTINS)
    return state


def _tampered(before):
    modules = dict(_all_modules())
    for key, value in before.items():
        if key in (("builtins",), ("test builtins",)):
            now = vars(builtins) if key == ("builtins",) else _TEST_BUILTINS
            for name, member in value.items():
                if now.get(name, _tampered) is not member:
                    return f"{key[0]}.{name}"
            if key == ("test builtins",) and len(now) != len(value):
                return "test builtins (a name added)"
            continue
        module = modules.get(key[0])
        if len(key) == 1:
            if module is not value:
                return f"sys.modules[{key[0]!r}]"
            continue
        attrs = getattr(module, "__dict__", {})
        now = attrs.get(key[1], _tampered)
        if len(key) == 3:
            members = _type_dict(now) if issubclass(type(now), type) else None
            now = _tampered if members is None else members.get(key[2], _tampered)
        if now is not value:
            return ".".join(key)
    return None


def _leftover_processes():
    """PIDs other than ours and our ancestors (valid only inside our own PID namespace)."""
    ancestors, pid = set(), getpid()
    while pid > 1:
        ancestors.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    ancestors.add(1)
    return sorted(int(p) for p in listdir("/proc") if p.isdigit() and int(p) not in ancestors)


def _describe(error):
    """`Type: message` of an exception the candidate may have crafted (any failure here is caught)."""
    try:
        text = f"{_type_name(type(error))}: {error}"
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = "an exception whose message cannot be printed"
    return text if type(text) is str else "an exception whose message cannot be printed"


def _run_unittest(namespace, class_names):
    """Run each test method of each class; a test passes only if it returns without raising."""
    tests, passed, first = 0, 0, ""
    plan = []
    for name in class_names:
        cls = namespace[name]
        methods = sorted(m for m in dir(cls) if m.startswith("test") and callable(getattr(cls, m)))
        if methods:  # as in unittest, a class without tests gets no setUpClass/tearDownClass
            plan.append((cls, methods))
    for cls, methods in plan:
        tests += len(methods)
        try:
            cls.setUpClass()
        except BaseException as e:  # noqa: BLE001 - none of the class's tests ran
            first = first or f"{cls.__name__}.setUpClass: {_describe(e)}"
            continue
        for method in methods:
            case = cls(method)
            try:
                case.setUp()
                try:
                    getattr(case, method)()
                finally:
                    case.tearDown()
                if not case.doCleanups():
                    raise RuntimeError("a cleanup failed")
            except BaseException as e:  # noqa: BLE001 - SkipTest and SystemExit fail the test too
                first = first or f"{method}: {_describe(e)}"
            else:
                passed += 1
        try:
            cls.tearDownClass()
        except BaseException as e:  # noqa: BLE001 - counted as one more failed test
            tests += 1
            first = first or f"{cls.__name__}.tearDownClass: {_describe(e)}"
    return tests, tests - passed, first


def _run_prefix(prefix, entry_point):
    """The names the task's trusted prefix defines, from a run of the prefix alone (or none)."""
    namespace = {"__name__": "__candidate__", "__file__": f"{getcwd()}/solution.py",
                 "__builtins__": _TEST_BUILTINS}
    try:
        exec(compile(prefix, "prompt.py", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - a prefix that runs only with its completion
        return {}
    return {k: v for k, v in namespace.items() if not k.startswith("__") and k != entry_point}


def _run(job, verdict):
    try:
        test_code = _compile_test(job["test"])
    except SyntaxError as e:
        return verdict(False, f"test code does not compile: {e}"[:500])
    for name in _imported_modules(job["test"]):  # loaded now, so recorded before the candidate runs
        try:
            _test_import(name, {"__name__": "__test__"}, None, ("__name__",))
        except BaseException:  # noqa: BLE001, S110 - the test's own import reports it
            pass
    if job["kind"] == "unittest":
        _guard_asserts(_private_module("unittest.case").TestCase)
    trusted = _run_prefix(job.get("prefix", ""), job.get("entry_point", ""))
    sys.modules["__main__"] = types.ModuleType("__main__")
    before = _snapshot()
    namespace = {
        "__name__": "__candidate__",
        "__file__": f"{getcwd()}/solution.py",
        "__builtins__": builtins,
    }
    try:
        exec(compile(job["program"], "solution.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the tests never ran
        return verdict(False, f"solution raised {_describe(e)}"[:500])
    if tampered := _tampered(before):
        return verdict(False, f"tampered with the test machinery ({tampered})")
    test_globals = {**namespace, **trusted, "__builtins__": _TEST_BUILTINS, _OP: _operate}
    try:
        exec(test_code, test_globals)
        if job["kind"] == "unittest":
            tests, failures, first = _run_unittest(test_globals, job["test_classes"])
        else:
            tests, failures, first = 1, 0, ""
        raised = None
    except BaseException as e:  # noqa: BLE001
        raised = f"test raised {_describe(e)}"
    if _forged:
        return verdict(False, _forged[0][:500], 1, 1)
    if test_globals.get(_OP) is not _operate:
        return verdict(False, "tampered with the test machinery (the tests' operator check)", 1, 1)
    if tampered := _tampered(before):
        return verdict(False, f"tampered with the test machinery ({tampered})", 1, 1)
    if raised:
        return verdict(False, raised[:500], 1, 1)
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
    sys.path.insert(0, getcwd())
    sys.setrecursionlimit(job.get("recursion_limit", 3000))
    verdict_fd = dup(1)
    nonce = job.pop("nonce")

    def verdict(passed, reason, tests=0, failures=0):
        line = '{"passed": %s, "reason": %s, "tests": %d, "failures": %d}' % (
            "true" if passed is True else "false", _quote(reason), tests, failures
        )
        write(verdict_fd, f"\n{nonce}{line}\n".encode())
        _exit(0)  # do not wait for threads the candidate left behind

    _run(job, verdict)


if __name__ == "__main__":
    main()
