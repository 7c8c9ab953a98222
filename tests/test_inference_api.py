"""fcdn.inference.segmenter: inference from Python with keywords gives the script's masks, and refuses
bad options before a model is loaded."""

import os

import numpy as np
import pytest
import tifffile
from conftest import DATA_IMAGES, REPO_ROOT, run_inference

import fcdn
import inference_fcdensenet
from fcdn.inference import runner
from fcdn.inference.segmenter import Segmenter, image_paths

DATA_MASKS = os.path.join(REPO_ROOT, "data", "masks")


def real_images(folder, count=4):
    """`count` real 256x256 images of data/images, as links in a folder of their own."""
    os.makedirs(folder)
    for name in sorted(os.listdir(DATA_IMAGES))[:count]:
        os.symlink(os.path.join(DATA_IMAGES, name), os.path.join(folder, name))
    return folder


# ---------------------------------------------------------------------------------------------
# no model

def test_bad_options_are_refused_before_the_model_is_loaded(tmp_path):
    images = image_paths(real_images(str(tmp_path / "images"), count=2))
    missing_model = Segmenter(str(tmp_path / "no_model"), log=lambda line: None)
    with pytest.raises(ValueError, match="give a list of image paths"):
        missing_model.segment_files(str(tmp_path / "images"), str(tmp_path / "masks"))
    with pytest.raises(ValueError, match="--output_folder is required"):
        missing_model.segment_files(images)
    with pytest.raises(ValueError, match="the output folder must differ from the image folder"):
        missing_model.segment_files(images, str(tmp_path / "images"))
    with pytest.raises(ValueError, match="the overlay folder must differ"):
        missing_model.segment_files(images, str(tmp_path / "masks"), overlay_folder=str(tmp_path / "masks"))
    with pytest.raises(ValueError, match=r"--part_id 2 must be in \[0, 2\)"):
        missing_model.segment_files(images, str(tmp_path / "masks"), num_parts=2, part_id=2)
    with pytest.raises(ValueError, match="SavedModel folder does not exist"):  # the options were fine
        missing_model.segment_files(images, str(tmp_path / "masks"))
    assert not os.path.exists(tmp_path / "masks")
    with pytest.raises(ValueError, match="--batch_size -1 must be at least 1"):
        Segmenter("unused", batch_size=-1)
    with pytest.raises(ValueError, match="unknown engine 'onnxruntime'"):
        Segmenter("unused", engine="onnxruntime")
    with pytest.raises(ValueError, match="no .png images"):
        image_paths(str(tmp_path / "images"), ".png")


def test_the_script_tells_its_version_and_a_flag_mistake_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference_fcdensenet.parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.endswith(f" {fcdn.__version__}\n")
    with pytest.raises(SystemExit) as exit_info:
        inference_fcdensenet.parse_args(["--saved_model_filepath", "m", "--image_folder", "i", "--tile_sise", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --tile_sise 1\n"


# ---------------------------------------------------------------------------------------------
# with a real model

@pytest.mark.slow
def test_python_api_gives_the_scripts_masks_scores_and_overlays(gray_model, tmp_path):
    model_path = gray_model[0]
    folder = real_images(str(tmp_path / "images"))
    names = sorted(os.listdir(folder))
    script = run_inference("--saved_model_filepath", model_path, "--image_folder", folder, "--output_folder",
                           tmp_path / "script", "--overlay_folder", tmp_path / "script_qc", "--tile_size", "288",
                           "--batch_size", "2", "--mask_folder", DATA_MASKS)
    assert script.returncode == 0, script.stderr

    lines = []
    segmenter = Segmenter(model_path, tile_size=288, batch_size=2, log=lines.append)
    results = segmenter.segment_files([os.path.join(folder, name) for name in names], str(tmp_path / "api"),
                                      overlay_folder=str(tmp_path / "api_qc"), mask_folder=DATA_MASKS)
    assert [os.path.basename(result.path) for result in results] == names
    assert all(result.error is None and result.failure is None for result in results)
    assert [(result.height, result.width) for result in results] == [(256, 256)] * len(names)
    for name in names:
        assert np.array_equal(tifffile.imread(tmp_path / "api" / name), tifffile.imread(tmp_path / "script" / name))
    assert sorted(os.listdir(tmp_path / "api_qc")) == sorted(os.listdir(tmp_path / "script_qc"))
    # the confusion matrices of the results add up to the scores the script prints
    scores = next(line for line in lines if line.startswith("scores against the ground truth"))
    assert scores in script.stdout
    assert sum(int(result.confusion.sum()) for result in results) == 256 * 256 * len(names)
    assert lines[0] in script.stdout.splitlines()  # the set-up line

    # the loaded model serves the next call; existing outputs are skipped when asked
    again = segmenter.segment_files([os.path.join(folder, name) for name in names], str(tmp_path / "api"),
                                    skip_existing=True)
    assert again == [] and f"skipping {len(names)} image(s) whose outputs exist" in lines
    bad = segmenter.segment_files([str(tmp_path / "images" / "missing.tif")], str(tmp_path / "api"))
    assert isinstance(bad[0].error, ValueError) and bad[0].failure.startswith(str(tmp_path / "images" / "missing.tif"))
    assert runner.is_zarr_image("images/a.ZARR/") and not runner.is_zarr_image("images/a.tif")

    # named devices: TensorFlow, placed there
    on_cpu = Segmenter(model_path, tile_size=288, devices=["/device:CPU:0"], log=lambda line: None)
    results = on_cpu.segment_files([os.path.join(folder, name) for name in names[:2]], str(tmp_path / "cpu"))
    assert all(result.error is None for result in results)
    assert on_cpu.engine == "tensorflow" and on_cpu.device_names == ["/device:CPU:0"]
    for name in names[:2]:  # OpenVINO and TensorFlow may differ where two classes tie
        assert np.mean(tifffile.imread(tmp_path / "cpu" / name) == tifffile.imread(tmp_path / "script" / name)) > 0.999
