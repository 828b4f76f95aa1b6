"""The project's import structure: packages import only downwards, no module circle, command modules are leaves.

Read statically with `ast` (nothing is imported), so a violation anywhere, even in a module no test
imports, fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: plumbing, data, the autoencoder, latent diffusion, the pipeline; then the command lines
LAYERS = {"thinslice": 0, "dataset": 1, "AutoEncoder": 2, "ddpm": 3, "evaluation": 4, "train": 5, "benchmarks": 5}
SCRIPTS = {"train", "benchmarks"}  # folders of command lines: they import; nothing imports them


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules a file imports (absolute and relative, at any depth; `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, Path]]:
    files = {}
    for top in LAYERS:
        for f in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            files[module_name(root, f)] = f
    known = set(files)
    return {m: imports_of(f, m, known) for m, f in files.items()}, files


def has_main(path: Path) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)


def is_script(m: str, path: Path) -> bool:
    """A command line the user runs by path: in train/ or benchmarks/, or a file that imports some `main`."""
    return m.split(".")[0] in SCRIPTS or any(isinstance(n, ast.ImportFrom) and any(a.name == "main" for a in n.names)
                                             for n in ast.parse(path.read_text()).body)


def violations(root: Path) -> list[str]:
    edges, files = graph(root)
    scripts = {m for m, f in files.items() if is_script(m, f)}
    commands = {m for m, f in files.items() if has_main(f)}
    out = []
    for m, targets in edges.items():
        top = m.split(".")[0]
        for t in sorted(targets):
            if LAYERS[t.split(".")[0]] > LAYERS[top]:
                out.append(f"upward import: {m} -> {t}")
            elif t in scripts:
                out.append(f"imports a script: {m} -> {t}")
            elif m not in scripts and t in commands:
                out.append(f"imports a command module: {m} -> {t}")
    # module circles: depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                out.append("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return out


def test_the_project_imports_only_downwards_without_circles():
    assert violations(ROOT) == []


def write(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"thinslice/__init__.py": "", "thinslice/config.py": "from evaluation.report import x\n",
      "evaluation/__init__.py": "", "evaluation/report.py": "x = 1\n"}, "upward import: thinslice.config -> evaluation.report"),
    ({"ddpm/__init__.py": "", "ddpm/a.py": "from . import b\n", "ddpm/b.py": "import ddpm.c\n",
      "ddpm/c.py": "from ddpm.a import f\n"}, "import circle: ddpm.a -> ddpm.b -> ddpm.c -> ddpm.a"),
    ({"ddpm/__init__.py": "", "ddpm/trainer.py": "def main():\n    pass\n\ndef build_unet():\n    pass\n",
      "ddpm/build.py": "from ddpm.trainer import build_unet\n"}, "imports a command module: ddpm.build -> ddpm.trainer"),
    ({"dataset/__init__.py": "", "dataset/x.py": "import train.train_unet_latent\n", "train/train_unet_latent.py": ""},
     "upward import: dataset.x -> train.train_unet_latent"),
    ({"ddpm/__init__.py": "", "ddpm/trainer.py": "def main():\n    pass\n", "ddpm/train.py": "from ddpm.trainer import main\n",
      "ddpm/x.py": "import ddpm.train\n"}, "imports a script: ddpm.x -> ddpm.train"),
])
def test_the_walker_catches_upward_imports_circles_and_imported_commands(tmp_path, files, expected):
    write(tmp_path, files)
    assert expected in violations(tmp_path)
