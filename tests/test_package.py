"""The package as users meet it: every script's --version, a quiet TensorFlow start, and the rule that
no module of the package imports an entry script. (.ci/check_install.sh installs the clone with pip
and runs the console commands from another folder.)"""

import ast
import os
import subprocess
import sys

import pytest
import tifffile
from conftest import REPO_ROOT, run_inference

import fcdn

SCRIPTS = ("build_lmdb.py", "train_fcdensenet.py", "inference_fcdensenet.py", "export_bioimageio.py",
           "measure_objects.py")
# what TensorFlow's C++ side prints at start-up unless TF_CPP_MIN_LOG_LEVEL hides it
STARTUP_NOISE = ("absl::InitializeLog", "cpu_feature_guard")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_names_its_version(script):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    name, version = result.stdout.split()
    assert name in (script, os.path.splitext(script)[0]) and version == fcdn.__version__


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_hidden_unless_the_user_asks(gray_model, mosaic, tmp_path):
    path, _, _ = gray_model
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", mosaic[:128, :128])
    arguments = ["--saved_model_filepath", path, "--image_folder", tmp_path / "images", "--engine", "tensorflow"]
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "inference_fcdensenet.py"), *map(str, arguments),
                            "--output_folder", str(tmp_path / "quiet")], capture_output=True, text=True,
                           timeout=300, env=environment)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if any(noise in line for noise in STARTUP_NOISE)]
    loud = run_inference(*arguments, "--output_folder", tmp_path / "loud", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0, loud.stderr
    assert any(noise in loud.stderr for noise in STARTUP_NOISE)


def imported_modules(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_module_of_the_package_imports_an_entry_script():
    scripts = {os.path.splitext(script)[0] for script in SCRIPTS}
    offenders = []
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, "fcdn")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                offenders += [f"{path}: {module}" for module in imported_modules(path) if module in scripts]
    for module in ("fcdensenet.py", "imagereader.py", "augment.py"):
        path = os.path.join(REPO_ROOT, module)
        offenders += [f"{path}: {name}" for name in imported_modules(path) if name in scripts]
    assert offenders == []
