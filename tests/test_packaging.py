"""One namespace (issue 19): the project installs as `fedrec` and nothing else.

server/, client/, shared/ and simulation/ are fedrec.server, fedrec.client, ... (pyproject.toml's
package-dir), so installing fedrec never puts a package named `shared` or `server` in
site-packages, where it would clash with anyone else's.
"""
import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("client", "server", "shared", "simulation")


def test_the_package_list_names_every_folder_with_code():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"fedrec"} | {"fedrec." + ".".join(p.parent.relative_to(ROOT).parts)
                            for folder in FOLDERS for p in (ROOT / folder).rglob("__init__.py")}
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {f"fedrec.{f}": f for f in FOLDERS}


def test_no_module_imports_a_folder_by_its_bare_name():
    bare = []
    for path in [p for folder in FOLDERS + ("fedrec", "tests") for p in (ROOT / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bare += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert bare == []


def test_the_installed_distribution_has_one_top_level_package():
    from importlib.metadata import distribution
    assert distribution("fedrec").read_text("top_level.txt").split() == ["fedrec"]


def test_a_wheel_installs_into_a_fresh_venv_as_fedrec_only(tmp_path):
    """Build the wheel from a copy of the sources, install it (no dependencies) into a new venv,
    then import it there: its version, its subpackages, and no bare `shared` or `server`."""
    source = tmp_path / "src"
    for name in FOLDERS + ("fedrec",):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # Hermetic: the simulation engine leaves PYTHONPATH set in this process (pip would then see the
    # project installed already and install nothing).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True, text=True, env=env)   # noqa: E731
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
        str(source))
    wheel = next((tmp_path / "wheel").glob("fedrec-*.whl"))
    assert {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()} == {"fedrec", wheel.name.split("-py")[0] + ".dist-info"}
    run(sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv"))
    fresh = tmp_path / "venv" / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(fresh), "install", "-q", "--no-deps", "--no-index",
        "--ignore-installed", str(wheel))
    probe = ("import importlib.util as u, fedrec; print(fedrec.__version__); "
             "print([n for n in ('fedrec.shared.protocol', 'fedrec.server.app', 'fedrec.client.app', "
             "'fedrec.simulation.federated', 'fedrec.shared.proto.recommend_pb2') if u.find_spec(n) is None]); "
             "print([n for n in ('shared', 'client', 'server', 'simulation') if u.find_spec(n)])")
    probed = subprocess.run([str(fresh), "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert probed.returncode == 0, probed.stderr
    out = probed.stdout.split("\n")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out[:3] == [version, "[]", "[]"]
