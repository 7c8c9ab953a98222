"""The whole job on the real example data, as a user runs it: build -> train -> SavedModel -> inference."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real models / worker processes / scripts

IMAGES = os.path.join(REPO_ROOT, "data", "images")
MASKS = os.path.join(REPO_ROOT, "data", "masks")
# FCDenseNet56's blocks at half the layers and growth: every stage the same, each model export and
# trace about half as long (the quick start runs the full variant)
SMALL_MODEL = ("--layers_per_block", 2, "--growth_rate", 8)


def run_script(script, *arguments):
    command = [sys.executable, os.path.join(REPO_ROOT, script), *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_build_train_export_segment_on_the_example_data(tmp_path):
    databases = tmp_path / "db"
    output = run_script("build_lmdb.py", "--image_folder", IMAGES, "--mask_folder", MASKS,
                        "--output_folder", databases, "--seed", 3)
    assert "80 train and 20 test records" in output
    train_db, test_db = databases / "train-HES.lmdb", databases / "test-HES.lmdb"

    run_dir = tmp_path / "run"
    output = run_script("train_fcdensenet.py", "--train_database", train_db, "--test_database", test_db,
                        "--output_dir", run_dir, "--batch_size", 2, "--test_every_n_steps", 3,
                        "--max_epochs", 2, "--log_every_n_steps", 1, "--seed", 0, "--crop_size", 128,
                        *SMALL_MODEL)
    assert "train records: 80  test records: 20  image size: 256x256 (training on 128x128 crops)" in output
    test_losses = (run_dir / "test_loss.csv").read_text().split()
    assert len(test_losses) == 2 and all(np.isfinite(float(value)) for value in test_losses)
    metrics_lines = (run_dir / "test_metrics.csv").read_text().splitlines()
    assert metrics_lines[0].startswith("epoch,global_step,test_loss") and len(metrics_lines) == 3
    assert glob.glob(str(run_dir / "checkpoint" / "ckpt*"))
    for part in ("train", "test"):
        events = glob.glob(str(run_dir / "tensorboard-*" / part / "events.out.tfevents.*"))
        assert events and os.path.getsize(events[0]) > 0

    test_names = (test_db / "img_filenames.csv").read_text().split()
    assert len(test_names) == 20
    image_folder = tmp_path / "images"
    image_folder.mkdir()
    chosen = test_names[:4]
    for name in chosen:
        (image_folder / name).symlink_to(os.path.join(IMAGES, name))
    # one image that is not a multiple of 32, as a user's crop would be
    crop = tifffile.imread(os.path.join(IMAGES, chosen[0]))[:201, :150]
    tifffile.imwrite(image_folder / "crop.tif", crop, compression="zlib")
    truth_folder = tmp_path / "truth"
    truth_folder.mkdir()
    for name in chosen:
        (truth_folder / name).symlink_to(os.path.join(MASKS, name))
    tifffile.imwrite(truth_folder / "crop.tif", tifffile.imread(os.path.join(MASKS, chosen[0]))[:201, :150])

    masks_folder = tmp_path / "masks"
    output = run_script("inference_fcdensenet.py", "--saved_model_filepath", run_dir / "saved_model",
                        "--image_folder", image_folder, "--output_folder", masks_folder,
                        "--mask_folder", truth_folder)
    assert "5 image(s) segmented, 0 failed" in output
    expected = np.zeros((2, 2), dtype=np.int64)
    for name in chosen + ["crop.tif"]:
        truth = tifffile.imread(truth_folder / name).astype(np.int64)
        predicted = tifffile.imread(masks_folder / name).astype(np.int64)
        expected += np.bincount((truth * 2 + predicted).ravel(), minlength=4).reshape(2, 2)
    accuracy = np.trace(expected) / expected.sum()
    assert f"scores against the ground truth: pixel accuracy {accuracy:.4f}" in output
    assert sorted(os.listdir(masks_folder)) == sorted(chosen + ["crop.tif"])
    for name in chosen:
        mask = tifffile.imread(masks_folder / name)
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
    crop_mask = tifffile.imread(masks_folder / "crop.tif")
    assert crop_mask.shape == (201, 150) and crop_mask.dtype == np.uint8
