"""The import structure: one package, `tune_launch`; the rank side never imports the launcher; no path hacks.

Static checks over the source files (no import needed), so a violation is named by file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAF = ROOT / "tune_launch"
PACKAGE_FOLDERS = {"tune_launch": LEAF, "tune_launch.launch": ROOT / "launch", "tune_launch.training": ROOT / "training"}
OLD_TOP_LEVEL = {"launch", "training"}  # the names the wheel used to install (ROS 2's `launch`, users' `training/`)


def _sources(*folders: Path) -> list[Path]:
    return sorted(p for f in folders for p in f.rglob("*.py") if ".venv" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_nothing_imports_the_old_top_level_names():
    bad = [f"{_where(p, ln)} imports {name}" for p in _sources(*PACKAGE_FOLDERS.values(), ROOT / "tests", ROOT / "bench")
           for ln, name in _imports(p) if name.split(".")[0] in OLD_TOP_LEVEL]
    assert not bad, "\n".join(bad)


def test_training_imports_only_itself_and_the_leaf_modules():
    leaf_modules = {f"tune_launch.{p.stem}" for p in LEAF.glob("*.py") if p.stem not in ("__init__", "__main__")}
    bad = []
    for p in _sources(ROOT / "training"):
        for ln, name in _imports(p):
            if not name.startswith("tune_launch"):
                continue
            ok = name.startswith("tune_launch.training") or any(name == m or name.startswith(m + ".") for m in leaf_modules)
            if not ok and name != "tune_launch":
                bad.append(f"{_where(p, ln)} imports {name}")
    assert not bad, "the rank side must not import the launcher:\n" + "\n".join(bad)


def test_leaf_modules_import_no_other_part_of_the_project():
    bad = []
    for p in LEAF.glob("*.py"):
        if p.stem == "__main__":  # `python -m tune_launch` is the CLI; nothing imports it
            continue
        for ln, name in _imports(p):
            if name.startswith(("tune_launch.launch", "tune_launch.training")):
                bad.append(f"{_where(p, ln)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_path_hacks_in_the_package():
    bad = []
    for p in _sources(*PACKAGE_FOLDERS.values(), ROOT / "bench"):
        text = p.read_text()
        for needle in ("sys.path.insert", "sys.path.append", '"PYTHONPATH"', "'PYTHONPATH'"):
            if needle in text:
                bad.append(f"{p.relative_to(ROOT)}: {needle}")
    assert not bad, "\n".join(bad)


def test_setup_finds_every_package_folder():
    import runpy

    import setuptools

    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(ROOT / "setup.py"))
    finally:
        setuptools.setup = real
    packages, dirs = captured["packages"], captured["package_dir"]
    on_disk = {"tune_launch"}
    for name, folder in (("tune_launch.launch", "launch"), ("tune_launch.training", "training")):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *rel.parts]))
    assert on_disk <= set(packages), sorted(on_disk - set(packages))
    assert {p.split(".")[0] for p in packages} == {"tune_launch"}
    assert dirs["tune_launch.accelerate_configs"] == "accelerate_configs"
