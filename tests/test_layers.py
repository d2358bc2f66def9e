"""The package's layers: method < attacks, evaluation < experiment. No module imports a layer above its own
(read from the source, so a lazy import inside a function counts too)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mima_lib"
RANK = {"method": 0, "attacks": 1, "evaluation": 1, "experiment": 2}


def _imported(source: str, parts: tuple) -> list[list[str]]:
    """The mima_lib sub-module paths a file (at parts, e.g. ('method', 'x.py')) imports, relative imports
    resolved: e.g. [['experiment', 'config']]."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:-1])[:len(parts) - node.level]
                out.append(base + (node.module.split(".") if node.module else []))
            elif node.module and node.module.split(".")[0] == "mima_lib":
                out.append(node.module.split(".")[1:])
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "mima_lib"]
    return out


def test_no_module_imports_a_layer_above_its_own():
    checked, bad = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in RANK:
            continue
        checked += 1
        bad += [f"{path.relative_to(PACKAGE)} imports {'.'.join(m)}" for m in _imported(path.read_text(), path.relative_to(PACKAGE).parts)
                if m and m[0] in RANK and RANK[m[0]] > RANK[layer]]
    assert checked > 40 and not bad, bad


def test_the_check_sees_an_upward_import():
    """Relative imports resolve as Python does: '..experiment' from method/x.py is upward, '.merge' is not."""
    source = "from ..experiment.config import slug\nfrom .merge import merge\nimport mima_lib.attacks.lora\n"
    assert _imported(source, ("method", "x.py")) == [["experiment", "config"], ["method", "merge"],
                                                     ["attacks", "lora"]]
