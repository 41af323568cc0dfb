"""The package layout (README "Layout"): layers import only downwards, no import cycles, and a light
``import spikeq``."""

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import spikeq

PACKAGE = Path(spikeq.__file__).parent
# From the bottom up: a module may import from its own layer and the layers before it.
LAYERS = ("files", "snn", "envs", "analysis", "experiment", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def spikeq_imports(path: Path) -> set[str]:
    """The spikeq modules ``path`` imports, at the top or inside functions (``from spikeq.x import
    y`` counts as ``spikeq.x.y`` when that is a module, else as ``spikeq.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("spikeq")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spikeq"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    assert {module for module in MODULES if layer(module) is None} == {"spikeq"}


def test_no_layer_imports_a_layer_above_it():
    upward = [
        f"{module} imports {target}"
        for module, path in MODULES.items()
        for target in spikeq_imports(path)
        if layer(module) is not None and layer(target) is not None and layer(target) > layer(module)
    ]
    assert upward == []


def test_no_two_modules_import_each_other_even_through_others():
    graph = {module: {t for t in spikeq_imports(path) if t in MODULES} for module, path in MODULES.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()]:
                if target == goal:
                    return True
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    # A package's __init__ importing its own submodules is how packages are built, not a cycle.
    cycles = sorted(
        f"{module} <-> {target}"
        for module in graph
        for target in graph[module]
        if not target.startswith(module + ".") and reaches(target, module)
    )
    assert cycles == []


def fresh_interpreter(code: str) -> list[str]:
    """The lines ``code`` prints, run in a new Python process (imports start from nothing)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("\n")


def test_import_spikeq_loads_the_network_only_and_registers_the_policy():
    code = (
        "import sys, spikeq\n"
        "from stable_baselines3 import DQN\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('spikeq.')}))\n"
        "print(DQN.policy_aliases['SpikingPolicy'].__module__)\n"
    )
    assert fresh_interpreter(code)[:2] == ["['snn']", "spikeq.snn.policy"]


def test_classes_pickled_under_the_former_module_paths_still_load():
    """SB3 zips saved before the layer packages pickle classes as ``spikeq.policy.SpikingPolicy``."""
    from spikeq.envs.replay import FrameReplayBuffer
    from spikeq.snn.network import MinAtarCNN

    for old, cls in (
        ("spikeq.policy", spikeq.SpikingPolicy),
        ("spikeq.network", MinAtarCNN),
        ("spikeq.replay", FrameReplayBuffer),
    ):
        assert pickle.loads(f"c{old}\n{cls.__name__}\n.".encode()) is cls  # a protocol-0 class reference
    assert set(spikeq.MOVED_MODULES.values()) <= set(MODULES)
    assert not set(spikeq.MOVED_MODULES) & set(MODULES)  # a former path never shadows a module


def test_a_module_imported_under_its_former_path_keeps_its_own_name():
    """Importing ``spikeq.readout`` answers with ``spikeq.snn.readout`` and leaves it as it was: its
    ``__spec__`` names it, so ``importlib.reload`` runs its code again (in a fresh interpreter: the
    import machinery handles a path once per process)."""
    code = (
        "import importlib, spikeq.readout as old, spikeq.snn.readout as new\n"
        "print(old is new, new.__spec__.name)\n"
        "new.READOUTS = ()\n"
        "importlib.reload(new)\n"
        "print(new.READOUTS[0])\n"
    )
    assert fresh_interpreter(code)[:2] == ["True spikeq.snn.readout", "rate"]
