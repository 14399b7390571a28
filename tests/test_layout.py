"""The package's shape, checked: no import circle among livemig's modules (module-level imports),
the orchestrator reaches workloads only through their protocol, no module past ~500 lines, and
every protocol number has one home (the core's enums)."""

from __future__ import annotations

import ast
from pathlib import Path

import livemig
from livemig import _core, protocol

PACKAGE = Path(livemig.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _module_level_imports(path: Path) -> set[str]:
    """livemig modules imported at module level (not inside functions, not for type checking)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("livemig"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("livemig"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


def test_no_import_circle() -> None:
    mods = _modules()
    graph = {m: {i for i in _module_level_imports(p) if i in mods and i != m} for m, p in mods.items()}
    # A package's __init__ importing its own modules is how packages work, not a circle: a module
    # importing its package's __init__ is what closes one, so edges into a package count.
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if n.startswith(m + "."):
                continue  # a package's __init__ importing its own submodule
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(n):], n]))
            if state.get(n) is None:
                dfs(n)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m)


def test_the_orchestrator_sees_workloads_only_through_their_protocol() -> None:
    mods = _modules()
    for name, path in mods.items():
        if not name.startswith("livemig.migration"):
            continue
        imported = _module_level_imports(path)
        for forbidden in ("livemig.workload.model", "livemig.workload.buffer", "livemig.workload.factory",
                          "livemig.guest"):
            assert not any(i == forbidden or i.startswith(forbidden + ".") for i in imported), (name, forbidden)


def test_no_module_is_too_long() -> None:
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= 520, f"{name}: {lines} lines"


def test_protocol_numbers_come_from_the_core() -> None:
    assert protocol.FrameType is _core.FrameType and protocol.Command is _core.Command
    assert protocol.AckKind is _core.AckKind and protocol.ChannelKind is _core.ChannelKind
    assert protocol.BalloonState is _core.BalloonState
    assert [int(c) for c in protocol.Command] == [1, 2, 3, 4, 5, 6]
    assert [int(k) for k in protocol.AckKind] == [0, 1, 2]
    assert protocol.BALLOON_FIRST_ROUND_ID == 0x80000001 and protocol.BALLOON_CMD_DONE == 1
