"""Shared by the tests: the repository root on sys.path, tiny exported models, a real image mosaic,
and running inference_fcdensenet.py as a user would."""

import contextlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
DATA_IMAGES = os.path.join(REPO_ROOT, "data", "images")
INFERENCE_SCRIPT = os.path.join(REPO_ROOT, "inference_fcdensenet.py")
# one layer per block, growth 2, 8 first filters: a radius of 96 pixels, a forward pass in milliseconds
TINY = dict(variant=None, layers_per_block=1, growth_rate=2, first_filters=8)


def export_tiny_model(path, number_channels, number_classes, seed):
    import keras

    import fcdensenet
    from fcdn.model import saved_model

    keras.utils.set_random_seed(seed)
    model = fcdensenet.build_model(number_channels=number_channels, number_classes=number_classes, **TINY)
    saved_model.export_saved_model(model, path)
    return saved_model.load_saved_model(path)


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory):
    """The OpenVINO conversions of the tests' models go to a folder of the session (and the scripts the
    tests start inherit it), never into the user's own cache."""
    from fcdn.inference import openvino_cache

    folder = str(tmp_path_factory.mktemp("cache") / "fcdensenet")
    previous = os.environ.get(openvino_cache.CACHE_ENV)
    os.environ[openvino_cache.CACHE_ENV] = folder
    yield folder
    if previous is None:
        os.environ.pop(openvino_cache.CACHE_ENV, None)
    else:
        os.environ[openvino_cache.CACHE_ENV] = previous


@pytest.fixture(scope="session")
def gray_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "gray")
    predict, metadata = export_tiny_model(path, number_channels=1, number_classes=2, seed=1)
    return path, predict, metadata


@pytest.fixture(scope="session")
def rgb_model(tmp_path_factory):
    # 300 classes: the masks need uint16
    path = str(tmp_path_factory.mktemp("models") / "rgb")
    predict, metadata = export_tiny_model(path, number_channels=3, number_classes=300, seed=2)
    return path, predict, metadata


@pytest.fixture(scope="session")
def mosaic():
    """About 1500x1100 pixels of real uint16 phase-contrast images side by side."""
    import tifffile

    names = sorted(os.listdir(DATA_IMAGES))[:30]
    images = [tifffile.imread(os.path.join(DATA_IMAGES, name)) for name in names]
    return np.block([[images[5 * row + column] for column in range(5)] for row in range(6)])[:1500, :1100]




def run_inference(*args, env=None):
    """inference_fcdensenet.py with `args` in a fresh interpreter; `env` is added to the environment."""
    return subprocess.run([sys.executable, INFERENCE_SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=None if env is None else dict(os.environ, **env))


def last_line(text):
    """The script's own last line (TensorFlow prints start-up notices on stderr before it)."""
    return text.strip().splitlines()[-1]


@contextlib.contextmanager
def mounted_tmpfs(folder, size):
    """A tmpfs of `size` ("4m") mounted on the new folder `folder` for the block: a disk that really
    fills up (mounting needs root: the test is skipped where it is not permitted)."""
    os.mkdir(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill_disk(folder, leave):
    """A file that fills the file system of `folder` but for about `leave` bytes; returns its path."""
    filler = os.path.join(folder, "filler")
    stats = os.statvfs(folder)
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


# ----------------------------------------------------------------------------------------------
# tests marked `slurm` submit jobs to a real SLURM cluster on this machine (.ci/start_slurm.sh)

def slurm_cluster_state():
    """Why no SLURM cluster takes jobs here, or None when one does (a node of the default
    partition idle, mixed or allocated)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch and sinfo are not installed"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    states = {state.strip().rstrip("*~#") for state in answer.stdout.split()}
    if answer.returncode or not states & {"idle", "mix", "alloc"}:
        return f"sinfo says {(answer.stderr or answer.stdout).strip() or 'no node'}"
    return None


def pytest_collection_modifyitems(config, items):
    """The slurm tests run only when -m names them (`pytest -m slurm tests`, a step of its own in
    .ci/run): they submit whole jobs and take minutes, so the README's test command, with or without
    a cluster, leaves them out (and the header says so). With -m slurm and no cluster, each fails
    with the reason."""
    marked = [item for item in items if item.get_closest_marker("slurm")]
    if not marked or "slurm" in (config.getoption("markexpr") or ""):
        return
    config._slurm_deselected = len(marked)
    config.hook.pytest_deselected(items=marked)
    items[:] = [item for item in items if not item.get_closest_marker("slurm")]


def pytest_report_collectionfinish(config):
    if getattr(config, "_slurm_deselected", None):
        return (f"slurm: {config._slurm_deselected} tests marked slurm left out; run them with "
                "`pytest -m slurm tests` where a SLURM cluster runs (`sudo bash .ci/start_slurm.sh` starts one)")
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    why = slurm_cluster_state()
    if why is not None:
        pytest.fail(f"no SLURM cluster here ({why}): start one with `sudo bash .ci/start_slurm.sh`", pytrace=False)
