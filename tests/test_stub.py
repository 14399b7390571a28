"""``_core.pyi`` cannot drift from the extension: every name the module (and its ``_bench``
submodule) exports is in the stub and the other way round, every class has the same public
members in both, enums the same members, and every function and method the same parameter names
as the binding's own signature (pybind11 writes it as the first line of ``__doc__``). It runs in
a fraction of a second with nothing but the standard library (``mypy.stubtest`` does more, but
needs mypy where the tests run and a list of pybind11's artefacts to ignore)."""

from __future__ import annotations

import ast
import enum
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import livemig
from livemig import _core

STUB = Path(livemig.__file__).with_name("_core.pyi")
#: Bindings known to lack their stub, each with who adds it. An entry that is no longer missing
#: fails the test too: remove it then.
PENDING: set[str] = set()
# What pybind11 puts on every class or enum, and what Python does: not the binding's API.
_ARTEFACTS = re.compile(r"^(__\w+__|_pybind11_\w+)$")


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text(), str(STUB))


def _stub_members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return out


def _runtime_members(obj: type) -> set[str]:
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return set(obj.__members__) | {k for k in vars(obj) if not k.startswith("_") and k not in obj.__members__
                                       and not isinstance(vars(obj)[k], enum.Enum)}
    return {k for k in vars(obj) if not _ARTEFACTS.match(k)} | ({"__init__"} if "__init__" in vars(obj) else set())


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def _runtime_params(fn: Any) -> list[str] | None:
    """Parameter names from pybind11's signature line; None when it has none (or overloads)."""
    doc = getattr(fn, "__doc__", None) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    m = re.match(r"^\w+\((.*)\)\s*->", first)
    if m is None or "Overloaded function" in doc:
        return None
    names = [p.split(":")[0].split("=")[0].strip() for p in _split_top(m[1])]
    return [n.lstrip("*") for n in names if n and n not in ("*", "/")]


def _stub_params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in [*a.posonlyargs, *a.args]]
    if a.vararg:
        names.append(a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append(a.kwarg.arg)
    return names


def _decorated(fn: ast.FunctionDef, name: str) -> bool:
    return any(isinstance(d, ast.Name) and d.id == name for d in fn.decorator_list)


def _drift(runtime: Any, stub_classes: dict[str, ast.ClassDef], stub_top: dict[str, ast.AST], where: str) -> list[str]:
    errors: list[str] = []
    public = {k for k in vars(runtime) if not k.startswith("__") and not (k.startswith("_") and k != "_bench")}
    for name in sorted(public - set(stub_top)):
        errors.append(f"{where}.{name}: in the extension, not in the stub")
    for name in sorted(set(stub_top) - public):
        errors.append(f"{where}.{name}: in the stub, not in the extension")
    for name in sorted(public & set(stub_top)):
        obj, node = getattr(runtime, name), stub_top[name]
        if isinstance(node, ast.ClassDef) and isinstance(obj, type):
            errors += _class_drift(obj, node, f"{where}.{name}")
        elif isinstance(node, ast.FunctionDef) and callable(obj):
            errors += _params_drift(obj, node, f"{where}.{name}", method=False)
    return errors


def _class_drift(cls: type, node: ast.ClassDef, where: str) -> list[str]:
    errors: list[str] = []
    stub = _stub_members(node)
    stub_public = {k for k in stub if not _ARTEFACTS.match(k) or k == "__init__"}
    runtime = _runtime_members(cls)
    for name in sorted(runtime - stub_public - {"__init__"}):
        errors.append(f"{where}.{name}: in the extension, not in the stub")
    for name in sorted(stub_public - runtime - {"__init__"}):
        errors.append(f"{where}.{name}: in the stub, not in the extension")
    for name in sorted(runtime & stub_public):
        fn = stub[name]
        if isinstance(fn, ast.FunctionDef) and not _decorated(fn, "property"):
            static = _decorated(fn, "staticmethod")
            errors += _params_drift(inspect.getattr_static(cls, name), fn, f"{where}.{name}", method=not static)
    return errors


def _params_drift(obj: Any, fn: ast.FunctionDef, where: str, method: bool) -> list[str]:
    target = obj.__func__ if isinstance(obj, staticmethod) else obj
    got = _runtime_params(target)
    if got is None:
        return []
    want = _stub_params(fn)
    if got != want:
        return [f"{where}: parameters {got} in the extension, {want} in the stub"]
    return []


def test_the_stub_matches_the_extension() -> None:
    mod = _stub()
    top: dict[str, ast.AST] = {}
    classes: dict[str, ast.ClassDef] = {}
    for node in mod.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = node
            top[node.name] = node
        elif isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.Assign)):
            for name in ([node.name] if isinstance(node, ast.FunctionDef) else
                         [node.target.id] if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                         else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]):
                top[name] = node
    # The stub describes the _bench submodule as a class (_Bench) and names it `_bench: _Bench`;
    # its private helper classes (_DestRawCopy, ...) are the submodule's.
    helpers = {k: v for k, v in top.items() if k.startswith("_") and k not in ("_bench", "_Bench")}
    main = {k: v for k, v in top.items() if not k.startswith("_") or k == "_bench"}
    errors = _drift(_core, classes, main, "_core")
    bench_stub = _stub_members(classes["_Bench"])
    bench_top: dict[str, ast.AST] = {**bench_stub}
    for attr, node in bench_stub.items():  # `DestRawCopy: type[_DestRawCopy]` names a helper class
        if isinstance(node, ast.AnnAssign) and (m := re.search(r"type\[(\w+)\]", ast.unparse(node.annotation))):
            bench_top[attr] = helpers.get(m[1], node)
    errors += _drift(_core._bench, classes, {k: v for k, v in bench_top.items() if not _ARTEFACTS.match(k)},
                     "_core._bench")
    missing = {e.split(":")[0] for e in errors if e.endswith("in the extension, not in the stub")}
    errors = [e for e in errors if e.split(":")[0] not in PENDING]
    errors += [f"{n}: listed as PENDING but no longer missing from the stub: remove it" for n in sorted(PENDING - missing)]
    assert not errors, "\n".join(errors)


def test_the_check_sees_a_parameter_renamed_in_the_stub(tmp_path: Path, monkeypatch: Any) -> None:
    """The signature comparison is not vacuous: a stub whose PageBitmap.count calls its first
    parameter 'begin' (the binding says 'start') is caught, and so is a method the stub lacks."""
    text = STUB.read_text()
    assert "def count(self, start: int = 0, end: int | None = None) -> int: ..." in text
    bad = text.replace("def count(self, start: int = 0, end: int | None = None) -> int: ...",
                       "def count(self, begin: int = 0, end: int | None = None) -> int: ...", 1)
    bad = bad.replace("    def test_and_clear(self, page: int) -> bool: ...\n", "", 1)
    fake = tmp_path / "_core.pyi"
    fake.write_text(bad)
    monkeypatch.setattr(sys.modules[__name__], "STUB", fake)
    try:
        test_the_stub_matches_the_extension()
    except AssertionError as e:
        assert "_core.PageBitmap.count: parameters ['self', 'start', 'end'] in the extension" in str(e)
        assert "_core.PageBitmap.test_and_clear: in the extension, not in the stub" in str(e)
    else:
        raise AssertionError("the drift was not seen")
