"""core/ is the engine and knows nothing of Dagster: checked over every module of every subpackage."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import memopt_pipeline.core as core

CORE_DIR = Path(core.__file__).parent


def core_module_names() -> list[str]:
    """Every module under core/, except ``__main__`` entry points (importing one runs it)."""
    names = [m.name for m in pkgutil.walk_packages(core.__path__, prefix="memopt_pipeline.core.")]
    return [name for name in names if not name.endswith(".__main__")]


def test_every_core_file_is_found_including_subpackages():
    files = {p for p in CORE_DIR.rglob("*.py")}
    nested = [p for p in files if p.parent != CORE_DIR]
    assert len(nested) >= 20  # the subpackages are scanned, not only the top folder
    modules = set(core_module_names())
    for path in files:
        relative = path.relative_to(CORE_DIR).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        if parts and parts[-1] != "__main__":
            assert "memopt_pipeline.core." + ".".join(parts) in modules, path


def test_no_core_module_mentions_a_dagster_import():
    offenders = []
    for path in sorted(CORE_DIR.rglob("*.py")):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import dagster", "from dagster")):
                offenders.append(f"{path.relative_to(CORE_DIR)}: {stripped}")
    assert not offenders


def test_importing_every_core_module_does_not_load_dagster():
    modules = core_module_names()
    assert len(modules) >= 30
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
