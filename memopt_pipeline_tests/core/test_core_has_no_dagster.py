import pkgutil
import subprocess
import sys
from pathlib import Path

import memopt_pipeline.core as core


def test_no_core_module_mentions_a_dagster_import():
    offenders = []
    for path in Path(core.__file__).parent.glob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import dagster", "from dagster")):
                offenders.append(f"{path.name}: {stripped}")
    assert not offenders


def test_importing_every_core_module_does_not_load_dagster():
    modules = [f"memopt_pipeline.core.{m.name}" for m in pkgutil.iter_modules(core.__path__)]
    assert len(modules) >= 10
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
