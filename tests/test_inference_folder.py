"""A folder at a time: small images batched across files, every device, job-array parts, resuming, progress."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from conftest import INFERENCE_SCRIPT, REPO_ROOT, fill_disk, last_line, mounted_tmpfs, run_inference

import inference_fcdensenet as inference
from fcdn.inference import pipeline, segmentation, segmenter
from fcdn.inference import runner as inference_runner


def small_folder(folder, mosaic, count=7):
    """`count` images of 96x128 (one tile each) and one of 700x500 (several tiles at --tile_size 288)."""
    os.makedirs(folder)
    images = {}
    for index in range(count):
        images[f"small_{index}.tif"] = mosaic[96 * index:96 * index + 96, index * 50:index * 50 + 128]
    images["large.tif"] = mosaic[:700, :500]
    for name, image in images.items():
        tifffile.imwrite(os.path.join(folder, name), image)
    return images


# ---------------------------------------------------------------------------------------------
# pieces, without a model

def test_prefetch_keeps_order_and_raises_the_producers_error_after_its_items():
    def items():
        yield from range(5)
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in pipeline.prefetch(items(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_job_array_parts_come_from_the_flags_or_slurm():
    def part(flags, environment):
        args = inference.parse_args(["--saved_model_filepath", "m", "--image_folder", "i", "--output_folder", "o",
                                     *flags])
        return segmenter.job_array_part(args.num_parts, args.part_id, environment)

    assert part([], {}) == (1, 0)
    assert part(["--num_parts", "3", "--part_id", "2"], {}) == (3, 2)
    slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert part([], slurm) == (4, 2)  # the task's index within the array, not its id
    assert part([], dict(slurm, SLURM_ARRAY_TASK_ID="9", SLURM_ARRAY_TASK_STEP="2")) == (4, 2)
    assert part(["--part_id", "0"], slurm) == (4, 0)  # a flag wins
    for flags, words in ((["--num_parts", "0"], "--num_parts 0 must be at least 1"),
                         (["--num_parts", "3", "--part_id", "3"], "--part_id 3 must be in [0, 3)"),
                         (["--part_id", "-1"], "--part_id -1 must be in [0, 1)")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(")", r"\)")):
            part(flags, {})


# ---------------------------------------------------------------------------------------------
# with a real model

@pytest.mark.slow
def test_small_images_of_one_shape_share_forward_passes_and_get_their_own_masks(gray_model, mosaic, tmp_path):
    _, predict, metadata = gray_model
    images = small_folder(str(tmp_path / "images"), mosaic)
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return predict(batch)

    options = inference_runner.RunnerOptions(tile_size=288, output_folder=str(tmp_path / "masks"))
    os.makedirs(options.output_folder)
    names = sorted(images)
    results = list(inference_runner.segment_images([str(tmp_path / "images" / name) for name in names],
                                                   counted, metadata, options))
    assert [os.path.basename(result.path) for result in results] == names
    assert all(result.error is None for result in results)
    # large.tif: tiles of 288x288, one a pass; then each 96x128 image is one 96x128 tile and six fit in
    # the 288x288-pixel budget of a pass: the seven run in two passes instead of seven
    large_tiles = results[0].tiles
    assert large_tiles > 1 and calls == [1] * large_tiles + [6, 1]
    for name, image in images.items():
        expected = segmentation.segment_array(image, predict, metadata, 288)
        assert np.array_equal(tifffile.imread(tmp_path / "masks" / name), expected), name


@pytest.mark.slow
def test_three_parts_write_every_image_once_and_equal_one_run(gray_model, mosaic, tmp_path):
    model_path = gray_model[0]
    images = small_folder(str(tmp_path / "images"), mosaic)
    common = ["--saved_model_filepath", model_path, "--image_folder", str(tmp_path / "images"), "--tile_size", "288"]
    whole = run_inference(*common, "--output_folder", str(tmp_path / "one_run"))
    assert whole.returncode == 0, whole.stderr
    written = []
    for part in range(3):
        result = run_inference(*common, "--output_folder", str(tmp_path / "parts"),
                               env={"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": str(10 + part),
                                    "SLURM_ARRAY_TASK_MIN": "10"})
        assert result.returncode == 0, result.stderr
        assert f"part {part} of 3: " in result.stdout
        written += [line.split(":")[0] for line in result.stdout.splitlines() if ".tif: " in line]
    assert sorted(written) == sorted(images)  # every image exactly once
    for name in images:
        assert np.array_equal(tifffile.imread(tmp_path / "parts" / name), tifffile.imread(tmp_path / "one_run" / name))

    # a requeued task with --skip_existing 1 leaves what is there and does the rest
    os.remove(tmp_path / "parts" / "small_3.tif")
    before = os.stat(tmp_path / "parts" / "small_0.tif").st_mtime_ns
    again = run_inference(*common, "--output_folder", str(tmp_path / "parts"), "--skip_existing", "1")
    assert again.returncode == 0, again.stderr
    assert f"skipping {len(images) - 1} image(s) whose outputs exist" in again.stdout
    assert "small_3.tif: 96x128" in again.stdout and "small_0.tif" not in again.stdout
    assert os.stat(tmp_path / "parts" / "small_0.tif").st_mtime_ns == before
    assert np.array_equal(tifffile.imread(tmp_path / "parts" / "small_3.tif"),
                          tifffile.imread(tmp_path / "one_run" / "small_3.tif"))

    bad = run_inference(*common, "--output_folder", str(tmp_path / "bad"), "--num_parts", "2", "--part_id", "2")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert last_line(bad.stderr) == "error: --part_id 2 must be in [0, 2) (--num_parts 2)"
    assert not os.path.exists(tmp_path / "bad")


TWO_DEVICES = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import inference_fcdensenet
    inference_fcdensenet.main(sys.argv[2:])
""")


@pytest.mark.slow
def test_two_devices_give_the_masks_of_one(gray_model, mosaic, tmp_path):
    model_path = gray_model[0]
    small_folder(str(tmp_path / "images"), mosaic, count=3)
    shutil.copy(tmp_path / "images" / "large.tif", tmp_path / "images" / "large_2.tif")
    # TensorFlow on both sides: auto would run the one-device side on OpenVINO
    common = ["--saved_model_filepath", model_path, "--image_folder", str(tmp_path / "images"), "--tile_size", "288",
              "--batch_size", "2", "--engine", "tensorflow"]
    one = run_inference(*common, "--output_folder", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    script = tmp_path / "two_devices.py"
    script.write_text(TWO_DEVICES)
    two = subprocess.run([sys.executable, str(script), REPO_ROOT, *common, "--output_folder", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "2 devices (/device:CPU:0, /device:CPU:1)" in two.stdout.splitlines()[0]
    assert "devices" not in one.stdout.splitlines()[0]
    for name in sorted(os.listdir(tmp_path / "images")):
        assert np.array_equal(tifffile.imread(tmp_path / "two" / name), tifffile.imread(tmp_path / "one" / name)), name


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_and_a_log_gets_lines(gray_model, mosaic, tmp_path):
    if shutil.which("script") is None:
        pytest.skip("util-linux 'script' (a pseudo-terminal) is not installed")
    model_path = gray_model[0]
    small_folder(str(tmp_path / "images"), mosaic, count=2)
    command = [sys.executable, INFERENCE_SCRIPT, "--saved_model_filepath", model_path, "--image_folder",
               str(tmp_path / "images"), "--output_folder", str(tmp_path / "masks"), "--tile_size", "288"]
    on_terminal = subprocess.run(["script", "-qec", " ".join(command), "/dev/null"], capture_output=True,
                                 text=True, timeout=300)
    assert on_terminal.returncode == 0, on_terminal.stdout
    assert "3/3" in on_terminal.stdout and "image/s" in on_terminal.stdout  # tqdm's bar with its rate
    assert "small_0.tif: 96x128" not in on_terminal.stdout
    in_a_log = run_inference(*command[2:])
    assert "small_0.tif: 96x128, 1 tile(s)" in in_a_log.stdout and "image/s" not in in_a_log.stdout


@pytest.mark.slow
def test_a_full_disk_lists_the_masks_not_written_and_leaves_no_half_written_one(gray_model, mosaic, tmp_path):
    model_path, _, _ = gray_model
    images = small_folder(str(tmp_path / "images"), mosaic)
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        masks = disk / "masks"
        masks.mkdir()
        filler = fill_disk(disk, leave=40_000)  # room for a few 96x128 masks, not for all eight
        command = ["--saved_model_filepath", model_path, "--image_folder", str(tmp_path / "images"),
                   "--output_folder", str(masks), "--tile_size", "288"]
        full = run_inference(*command)
        assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert "No space left on device" in full.stderr
        failed = [line.strip().split(":")[0] for line in full.stderr.split("failed images:")[1].splitlines()
                  if line.strip()]
        written = sorted(os.listdir(masks))
        assert failed and not [name for name in written if name.startswith(".")]  # no half-written mask
        assert sorted(written + [os.path.basename(path) for path in failed]) == sorted(images)
        for name in written:  # each mask there is whole
            assert tifffile.imread(masks / name).shape == images[name].shape

        os.remove(filler)  # the same command once space is freed: only the failed images
        again = run_inference(*command, "--skip_existing", "1")
        assert again.returncode == 0, again.stderr[-3000:]
        assert sorted(os.listdir(masks)) == sorted(images)
