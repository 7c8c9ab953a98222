"""ome_zarr_io.py: OME-Zarr images written by ome-zarr-py (NGFF 0.4 and 0.5) read chunk-wise, and the
NGFF label images written from a mask validated with ome-zarr-models.

Images are small (300x200) with 64x64 chunks, so every read crosses chunk boundaries.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import REPO_ROOT, run_inference
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image
from ome_zarr.writer import write_labels as ome_zarr_py_write_labels
from ome_zarr_models.v04.image import Image as Image04
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabel04
from ome_zarr_models.v05.image import Image as Image05
from ome_zarr_models.v05.image_label import ImageLabel as ImageLabel05
from ome_zarr_models.v05.labels import Labels as Labels05

from fcdn.data import image_files, image_sources, ome_zarr_io

FORMATS = {"0.4": FormatV04(), "0.5": FormatV05()}
VALIDATORS = {"0.4": (Image04, ImageLabel04), "0.5": (Image05, ImageLabel05)}
HEIGHT, WIDTH, CHUNK = 300, 200, 64


def write_ome_zarr(path, data, axes, version, scale_factors=(2, 4)):
    """An OME-Zarr image written by ome-zarr-py: chunks of 64 along y and x, 1 along the others."""
    fmt = FORMATS[version]
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    chunks = tuple(CHUNK if name in "yx" else 1 for name in axes)
    write_image(data, group, axes=axes, fmt=fmt, scale_factors=scale_factors,
                storage_options={"chunks": chunks})
    return str(path)


def write_yxc_zarr(path, data, version):
    """ome-zarr-py refuses yxc ('space' axes must come after 'channel'), so this one is written
    directly with zarr: one level, the minimal metadata of the version."""
    zarr_format = FORMATS[version].zarr_format
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    options = {"dimension_names": ["y", "x", "c"]} if zarr_format == 3 else {}
    array = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(CHUNK, CHUNK, 1), **options)
    array[:] = data
    multiscale = {"axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"},
                           {"name": "c", "type": "channel"}],
                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                            "scale": [0.5, 0.5, 1.0]}]}]}
    if version == "0.4":
        group.attrs["multiscales"] = [dict(multiscale, version="0.4")]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return str(path)


def write_axes_zarr(path, data, axes, version):
    """One level of any axes, written directly with zarr (ome-zarr-py refuses unusual orders)."""
    zarr_format = FORMATS[version].zarr_format
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    options = {"dimension_names": list(axes)} if zarr_format == 3 else {}
    group.create_array("0", shape=data.shape, dtype=data.dtype, **options)[:] = data
    kinds = {"t": "time", "c": "channel"}
    multiscale = {"axes": [{"name": name, "type": kinds.get(name, "space")} for name in axes],
                  "datasets": [{"path": "0"}]}
    if version == "0.4":
        group.attrs["multiscales"] = [dict(multiscale, version="0.4")]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return str(path)


def synthetic_mask(number_classes, dtype=np.uint8, height=HEIGHT, width=WIDTH):
    rows, columns = np.mgrid[0:height, 0:width]
    return ((rows // 7 + columns // 11 + rows * columns // 97) % number_classes).astype(dtype)


def bands_of(mask, rows=37):
    """The mask as the tile loop yields it: full-width bands of rows, top to bottom (37 rows: never
    aligned with the 64-row chunks)."""
    for start in range(0, len(mask), rows):
        yield mask[start:start + rows]


def listing(image_path):
    """The names in the image's labels listing (NGFF 0.5 keeps it under 'ome')."""
    attributes = zarr.open_group(os.path.join(image_path, "labels"), mode="r").attrs.asdict()
    return attributes.get("ome", attributes)["labels"]


def leftovers(folder):
    return [name for name in os.listdir(folder) if ".tmp-" in name or ".old-" in name]


def staging_of(folder, pid):
    """The one staging folder of the label `fcdensenet` that process `pid` left in `folder`."""
    names = [name for name in leftovers(folder) if name.startswith(f".fcdensenet.tmp-{pid}-")]
    assert len(names) == 1, os.listdir(folder)
    return names[0]


def one_line(error):
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.fixture
def rng():
    return np.random.default_rng(17)


# ---------------------------------------------------------------------------------------------
# reading

LAYOUTS = [  # axes, shape, dtype
    ("yx", (HEIGHT, WIDTH), np.uint16),
    ("cyx", (3, HEIGHT, WIDTH), np.uint8),
    ("tczyx", (1, 2, 1, HEIGHT, WIDTH), np.float32),
    ("czyx", (1, 1, HEIGHT, WIDTH), np.int16),  # int16 becomes int32 (lossless)
]


def as_hwc(data, axes):
    """The reference: the array given to ome-zarr-py as height x width x channels."""
    for name in ("t", "z"):
        if name in axes:
            data = data.take(0, axis=axes.index(name))
            axes = axes.replace(name, "")
    return data[:, :, np.newaxis] if "c" not in axes else np.moveaxis(data, axes.index("c"), -1)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes,shape,dtype", LAYOUTS)
def test_rows_and_statistics_equal_the_array_written(tmp_path, rng, monkeypatch, version, axes, shape, dtype):
    data = (rng.random(shape) * 5000).astype(dtype)
    path = write_ome_zarr(tmp_path / "image.zarr", data, axes, version)
    expected = as_hwc(data, axes)
    # small statistics blocks: several blocks of whole chunk rows are merged
    monkeypatch.setattr(image_sources, "STATISTICS_BLOCK_PIXELS", 3 * CHUNK * WIDTH * expected.shape[2])
    with ome_zarr_io.ZarrSource.open(path) as source:
        assert source.shape == expected.shape and source.ngff_version == version
        assert len(source.levels) == 3 and source.levels[1].height == HEIGHT // 2
        for start, stop in [(0, 1), (63, 65), (100, 300), (0, HEIGHT), (299, 300)]:
            band = source.rows(start, stop)
            np.testing.assert_array_equal(band, expected[start:stop])
            assert band.dtype == (np.int32 if dtype == np.int16 else dtype)
        mean, std = source.statistics()
    image = expected.astype(np.float32)
    np.testing.assert_allclose(mean, image.mean(axis=(0, 1), dtype=np.float64), rtol=1e-7)
    np.testing.assert_allclose(std, image.std(axis=(0, 1), dtype=np.float64), rtol=1e-7)
    assert mean.dtype == np.float64 and mean.shape == (expected.shape[2],)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_yxc_images_are_read(tmp_path, rng, version):
    data = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = write_yxc_zarr(tmp_path / "yxc.zarr", data, version)
    with ome_zarr_io.ZarrSource.open(path) as source:
        assert source.shape == (HEIGHT, WIDTH, 3)
        np.testing.assert_array_equal(source.rows(50, 130), data[50:130])
        mean, std = source.statistics()
        np.testing.assert_allclose(mean, data.astype(np.float32).mean(axis=(0, 1), dtype=np.float64))
        np.testing.assert_allclose(std, data.astype(np.float32).std(axis=(0, 1), dtype=np.float64))
        written = ome_zarr_io.write_labels(source, bands_of(synthetic_mask(3)), np.uint8, 3)
    np.testing.assert_array_equal(zarr.open_array(os.path.join(written.path, "0"))[:], synthetic_mask(3))
    ImageLabel = VALIDATORS[version][1]
    label = ImageLabel.from_zarr(zarr.open_group(written.path, mode="r"))
    assert [axis.name for axis in label.ome_attributes.multiscales[0].axes] == ["y", "x"]
    assert label.ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale == [0.5, 0.5]


def chunk_files(level_folder, axes):
    """{y chunk index: [chunk files]} of a level written with '/' separated chunk keys."""
    files = {}
    for root, _, names in os.walk(level_folder):
        for name in names:
            if name.startswith((".", "zarr.json")):
                continue
            parts = os.path.relpath(os.path.join(root, name), level_folder).split(os.sep)
            parts = parts[1:] if parts[0] == "c" else parts  # zarr v3 keys start with 'c'
            files.setdefault(int(parts[axes.index("y")]), []).append(os.path.join(root, name))
    return files


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_rows_read_only_the_chunks_they_touch(tmp_path, rng, version):
    data = rng.integers(0, 60000, (2, HEIGHT, WIDTH), dtype=np.uint16)
    path = write_ome_zarr(tmp_path / "image.zarr", data, "cyx", version)
    for y_chunk, files in chunk_files(os.path.join(path, "s0"), "cyx").items():
        if y_chunk >= 2:  # rows 128 and below are corrupt: any read of them fails
            for file in files:
                with open(file, "wb") as handle:
                    handle.write(b"this is not a zstd-compressed chunk")
    with ome_zarr_io.ZarrSource.open(path) as source:
        np.testing.assert_array_equal(source.rows(0, 128), np.moveaxis(data, 0, -1)[:128])
        with pytest.raises(Exception):
            source.rows(100, 129)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes,shape,named", [
    ("yzx", (40, 3, 30), "z=3"),  # a stack axis between the image's rows and columns
    ("yxcz", (40, 30, 2, 4), "z=4"),
    ("tzx", (2, 3, 30), "t=2"),  # no y
])
def test_unsupported_axes_are_one_line_errors_naming_them(tmp_path, version, axes, shape, named):
    path = write_axes_zarr(tmp_path / "volume.zarr", np.zeros(shape, np.uint8), axes, version)
    with pytest.raises(image_files.ImageFileError) as error:
        ome_zarr_io.ZarrSource.open(path)
    text = one_line(error)
    assert text.startswith(path) and axes in text and named in text


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_tczyx_image_is_a_stack_of_planes(tmp_path, rng, version):
    data = rng.integers(0, 255, (2, 1, 3, 40, 30)).astype(np.uint8)
    path = write_ome_zarr(tmp_path / "volume.zarr", data, "tczyx", version, scale_factors=())
    with ome_zarr_io.ZarrSource.open(path) as source:
        assert (source.planes, source.stack_shape, source.shape) == (6, (2, 3), (40, 30, 1))
        assert [source.plane_key(index) for index in (0, 4)] == ["_t0_z0", "_t1_z1"]
        plane = source.plane_source(4)
        np.testing.assert_array_equal(plane.rows(10, 20)[:, :, 0], data[1, 0, 1, 10:20])
        np.testing.assert_array_equal(source.rows(0, 5)[:, :, 0], data[0, 0, 0, :5])  # the source stays on plane 0


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_zarr_that_is_not_an_ome_zarr_image_is_refused(tmp_path, zarr_format):
    path = str(tmp_path / "plain.zarr")
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    group.create_array("0", shape=(10, 10), dtype="uint8")
    with pytest.raises(image_files.ImageFileError) as error:
        ome_zarr_io.ZarrSource.open(path)
    assert one_line(error).startswith(path) and "not an OME-Zarr image" in str(error.value)
    group.attrs["multiscales"] = [{"version": "0.3", "axes": ["y", "x"], "datasets": [{"path": "0"}]}]
    if zarr_format == 3:
        group.attrs["ome"] = {"version": "0.6", "multiscales": group.attrs["multiscales"]}
    with pytest.raises(image_files.ImageFileError) as error:
        ome_zarr_io.ZarrSource.open(path)
    assert one_line(error).startswith(path) and "is not supported" in str(error.value)
    os.makedirs(tmp_path / "empty.zarr")
    with pytest.raises(image_files.ImageFileError) as error:
        ome_zarr_io.ZarrSource.open(str(tmp_path / "empty.zarr"))
    assert one_line(error).startswith(str(tmp_path / "empty.zarr")) and "not a zarr group" in str(error.value)


def test_list_zarr_images(tmp_path):
    for name in ["b.zarr", "a.ome.zarr", "C.ZARR"]:
        os.makedirs(tmp_path / name)
    (tmp_path / "file.zarr").write_text("not a folder")
    (tmp_path / "image.tif").write_text("")
    assert ome_zarr_io.list_zarr_images(str(tmp_path)) == ["C.ZARR", "a.ome.zarr", "b.zarr"]
    with pytest.raises(image_files.ImageFileError):
        ome_zarr_io.list_zarr_images(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# writing labels

@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes,shape,size,number_classes,dtype", [
    ("cyx", (3, HEIGHT, WIDTH), (HEIGHT, WIDTH), 5, np.uint8),
    ("tczyx", (1, 1, 1, HEIGHT, WIDTH), (HEIGHT, WIDTH), 300, np.uint16),
    ("yx", (301, 203), (301, 203), 4, np.uint8),  # odd sizes: ome-zarr-py's levels are 150x101, 75x50
])
def test_labels_pyramid_metadata_and_validation(tmp_path, version, axes, shape, size, number_classes, dtype):
    path = write_ome_zarr(tmp_path / "image.zarr", np.ones(shape, np.uint8), axes, version)
    mask = synthetic_mask(number_classes, dtype, *size)
    with ome_zarr_io.ZarrSource.open(path) as source:
        written = ome_zarr_io.write_labels(source, bands_of(mask), dtype, number_classes)
        levels = source.levels
    assert written.path == os.path.join(path, "labels", "fcdensenet")
    assert not written.replaced and written.levels == 3 and written.listing == ["fcdensenet"]
    image = zarr.open_group(path, mode="r")
    label = zarr.open_group(written.path, mode="r")
    leading = (1, 1) if axes == "tczyx" else ()
    for k, level in enumerate(levels):
        stored = label[str(k)]
        assert stored.shape == leading + (level.height, level.width) and stored.dtype == dtype
        # the rule: nearest neighbour, label_k = label_k-1[::2, ::2], so mask[::2**k, ::2**k]
        expected = mask[::2**k, ::2**k][:level.height, :level.width]
        np.testing.assert_array_equal(stored[...].reshape(expected.shape), expected)
        assert stored.shape[-2:] == image[level.path].shape[-2:]
    Image, ImageLabel = VALIDATORS[version]
    model = Image.from_zarr(image)  # the image with its labels
    assert model.labels.ome_attributes.labels == ["fcdensenet"]
    label_model = ImageLabel.from_zarr(label)  # the label image itself
    multiscale = label_model.ome_attributes.multiscales[0]
    assert [axis.name for axis in multiscale.axes] == (["t", "z", "y", "x"] if axes == "tczyx" else ["y", "x"])
    image_datasets = model.ome_attributes.multiscales[0].datasets
    for label_dataset, image_dataset in zip(multiscale.datasets, image_datasets, strict=True):
        # the same pixel sizes and offsets as the image level, along y and x
        for label_transform, image_transform in zip(label_dataset.coordinateTransformations,
                                                    image_dataset.coordinateTransformations, strict=True):
            assert label_transform.model_dump()[label_transform.type][-2:] == \
                image_transform.model_dump()[image_transform.type][-2:]
    colors = label_model.ome_attributes.image_label.colors
    assert [color.label_value for color in colors] == list(range(number_classes))
    assert len({color.rgba for color in colors}) == number_classes and colors[0].rgba[3] == 0
    assert label_model.ome_attributes.image_label.source.image == "../../"
    assert leftovers(os.path.join(path, "labels")) == []


class Interrupted(Exception):
    pass


def failing_bands(mask, after):
    for index, band in enumerate(bands_of(mask)):
        if index == after:
            raise Interrupted("the model failed mid-way")
        yield band


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_interrupted_write_leaves_listing_and_old_label_and_replacing_works(tmp_path, version):
    path = write_ome_zarr(tmp_path / "image.zarr", np.ones((HEIGHT, WIDTH), np.uint16), "yx", version)
    first, second = synthetic_mask(3), (synthetic_mask(3) + 1) % 3
    labels = os.path.join(path, "labels")
    def watched_bands():  # mid-way: the label is being built under a temporary name, unlisted
        for index, band in enumerate(failing_bands(first, after=3)):
            if index == 2:
                assert listing(path) == [] and leftovers(labels) == [staging_of(labels, os.getpid())]
            yield band

    with ome_zarr_io.ZarrSource.open(path) as source:
        with pytest.raises(Interrupted):  # first run, no labels yet: none listed afterwards
            ome_zarr_io.write_labels(source, watched_bands(), np.uint8, 3)
        assert listing(path) == [] and leftovers(labels) == []
        assert not os.path.exists(os.path.join(labels, "fcdensenet"))
        VALIDATORS[version][0].from_zarr(zarr.open_group(path, mode="r"))  # still a valid image
        ome_zarr_io.write_labels(source, bands_of(first), np.uint8, 3)
        with pytest.raises(Interrupted):  # the old label stays, whole and listed
            ome_zarr_io.write_labels(source, failing_bands(second, after=5), np.uint8, 3)
        assert listing(path) == ["fcdensenet"] and leftovers(labels) == []
        np.testing.assert_array_equal(zarr.open_array(os.path.join(labels, "fcdensenet", "0"))[:], first)
        written = ome_zarr_io.write_labels(source, bands_of(second), np.uint8, 3)
        assert written.replaced and written.listing == ["fcdensenet"]
        np.testing.assert_array_equal(zarr.open_array(os.path.join(labels, "fcdensenet", "1"))[:], second[::2, ::2])
        other = ome_zarr_io.write_labels(source, bands_of(first), np.uint8, 3, label_name="second_run")
    assert not other.replaced and other.listing == ["fcdensenet", "second_run"]
    assert leftovers(labels) == []
    VALIDATORS[version][0].from_zarr(zarr.open_group(path, mode="r"))


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from fcdn.data import ome_zarr_io
def bands():
    yield np.zeros((64, {width}), np.uint8)
    open({ready!r}, "w").close()
    time.sleep(120)
    yield np.zeros((64, {width}), np.uint8)
source = ome_zarr_io.ZarrSource.open({path!r})
ome_zarr_io.write_labels(source, bands(), np.uint8, 2)
"""


@pytest.mark.slow
def test_sigkill_mid_write_leaves_no_listed_label_and_the_next_run_cleans_up(tmp_path):
    path = write_ome_zarr(tmp_path / "image.zarr", np.ones((HEIGHT, WIDTH), np.uint16), "yx", "0.5")
    labels = os.path.join(path, "labels")
    with ome_zarr_io.ZarrSource.open(path) as source:
        ome_zarr_io.write_labels(source, bands_of(synthetic_mask(2)), np.uint8, 2)
    ready = str(tmp_path / "ready")
    script = KILLED_WRITER.format(root=REPO_ROOT, width=WIDTH, ready=ready, path=path)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not os.path.exists(ready) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(ready), "the writer never got to its second band"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert leftovers(labels) == [staging_of(labels, process.pid)]  # what SIGKILL leaves
    assert listing(path) == ["fcdensenet"]
    np.testing.assert_array_equal(zarr.open_array(os.path.join(labels, "fcdensenet", "0"))[:], synthetic_mask(2))
    Labels05.from_zarr(zarr.open_group(labels, mode="r"))
    with ome_zarr_io.ZarrSource.open(path) as source:
        written = ome_zarr_io.write_labels(source, bands_of(synthetic_mask(2) ^ 1), np.uint8, 2)
    assert written.replaced and leftovers(labels) == []


def test_a_label_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    path = write_ome_zarr(tmp_path / "image.zarr", np.ones((HEIGHT, WIDTH), np.uint16), "yx", "0.4")
    labels = os.path.join(path, "labels")
    with ome_zarr_io.ZarrSource.open(path) as source:
        ome_zarr_io.write_labels(source, bands_of(synthetic_mask(2)), np.uint8, 2)
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()  # its pid is that of a process no longer running
        # killed between its two renames: the old label is aside, the new one not in yet
        os.rename(os.path.join(labels, "fcdensenet"), os.path.join(labels, f".fcdensenet.old-{finished.pid}"))
        with pytest.raises(Interrupted):
            ome_zarr_io.write_labels(source, failing_bands(synthetic_mask(2), after=1), np.uint8, 2)
    np.testing.assert_array_equal(zarr.open_array(os.path.join(labels, "fcdensenet", "0"))[:], synthetic_mask(2))
    assert leftovers(labels) == [] and listing(path) == ["fcdensenet"]


def test_ome_zarr_py_labels_group_without_version_is_repaired(tmp_path):
    """ome-zarr-py 0.18's write_labels in NGFF 0.5 leaves 'version' out of the labels group."""
    path = write_ome_zarr(tmp_path / "image.zarr", np.ones((HEIGHT, WIDTH), np.uint16), "yx", "0.5")
    group = zarr.open_group(path, mode="r+")
    ome_zarr_py_write_labels(synthetic_mask(2), group, name="cells", axes="yx", fmt=FormatV05())
    with pytest.raises(Exception):
        Labels05.from_zarr(zarr.open_group(os.path.join(path, "labels"), mode="r"))
    with ome_zarr_io.ZarrSource.open(path) as source:
        written = ome_zarr_io.write_labels(source, bands_of(synthetic_mask(3)), np.uint8, 3)
    assert written.listing == ["cells", "fcdensenet"]
    model = Labels05.from_zarr(zarr.open_group(os.path.join(path, "labels"), mode="r"))
    assert model.label_paths == ["cells", "fcdensenet"]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_output_folder_label_image_points_back_at_the_source(tmp_path, version):
    images, output = tmp_path / "images", tmp_path / "out"
    path = write_ome_zarr(images / "sample.ome.zarr", np.ones((2, HEIGHT, WIDTH), np.uint8), "cyx", version)
    mask = synthetic_mask(4)
    with ome_zarr_io.ZarrSource.open(path) as source:
        written = ome_zarr_io.write_labels(source, bands_of(mask), np.uint8, 4, output_folder=str(output))
        again = ome_zarr_io.write_labels(source, bands_of(mask), np.uint8, 4, output_folder=str(output))
    assert written.path == str(output / "sample.ome.zarr") and not written.replaced and again.replaced
    assert not os.path.exists(os.path.join(path, "labels"))  # the image is left alone
    label = VALIDATORS[version][1].from_zarr(zarr.open_group(written.path, mode="r"))
    reference = label.ome_attributes.image_label.source.image
    assert os.path.realpath(os.path.join(written.path, reference)) == os.path.realpath(path)
    assert len(label.ome_attributes.multiscales[0].datasets) == 3
    np.testing.assert_array_equal(zarr.open_array(os.path.join(written.path, "2"))[:], mask[::4, ::4])
    assert leftovers(str(output)) == []
    # a zarr there that is no label image is never replaced
    write_ome_zarr(output / "other.zarr", np.ones((HEIGHT, WIDTH), np.uint8), "yx", version)
    write_ome_zarr(images / "other.zarr", np.ones((HEIGHT, WIDTH), np.uint8), "yx", version)
    with ome_zarr_io.ZarrSource.open(str(images / "other.zarr")) as source:
        with pytest.raises(image_files.ImageFileError) as error:
            ome_zarr_io.write_labels(source, iter([]), np.uint8, 2, output_folder=str(output))
    assert one_line(error).startswith(str(output / "other.zarr")) and "not a label image" in str(error.value)


def untouchable_bands():
    raise AssertionError("the bands were consumed although the target was refused")
    yield


@contextlib.contextmanager
def read_only_view(folder, view):
    """`view`: a read-only bind mount of `folder` (a real read-only file system, which stops root too)."""
    os.makedirs(view)
    mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"bind mounts are not permitted here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        yield str(view)
    finally:
        subprocess.run(["umount", str(view)], check=True)


@pytest.mark.slow
def test_read_only_image_without_output_folder_is_refused_before_any_work(tmp_path):
    write_ome_zarr(tmp_path / "images" / "image.zarr", np.ones((HEIGHT, WIDTH), np.uint8), "yx", "0.5")
    with read_only_view(tmp_path / "images", tmp_path / "read_only") as images:
        path = os.path.join(images, "image.zarr")
        with ome_zarr_io.ZarrSource.open(path) as source:
            with pytest.raises(image_files.ImageFileError) as error:
                ome_zarr_io.label_target(source)
            with pytest.raises(image_files.ImageFileError):
                ome_zarr_io.write_labels(source, untouchable_bands(), np.uint8, 2)
            written = ome_zarr_io.write_labels(source, bands_of(synthetic_mask(2)), np.uint8, 2,
                                               output_folder=str(tmp_path / "out"))
    assert one_line(error).startswith(path) and "read-only" in str(error.value)
    assert os.path.isdir(written.path) and not os.path.exists(os.path.join(tmp_path, "images", "image.zarr",
                                                                           "labels"))


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "__reserved", ".."])
def test_bad_label_names_are_refused(tmp_path, name):
    path = write_ome_zarr(tmp_path / "image.zarr", np.ones((40, 30), np.uint8), "yx", "0.5", scale_factors=())
    with ome_zarr_io.ZarrSource.open(path) as source:
        with pytest.raises(ValueError) as error:
            ome_zarr_io.write_labels(source, untouchable_bands(), np.uint8, 2, label_name=name)
    one_line(error)


def test_label_colors_are_distinct_for_many_classes():
    colors = ome_zarr_io.label_colors(5000)
    assert len(colors) == 5000 and len(set(colors)) == 5000 and colors[0] == (0, 0, 0, 0)
    assert all(len(color) == 4 and all(0 <= value <= 255 for value in color) for color in colors)


# ---------------------------------------------------------------------------------------------
# the same pixels as a TIFF give the same mask

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import keras

    import fcdensenet
    from fcdn.model import saved_model

    keras.utils.set_random_seed(3)
    model = fcdensenet.build_model(number_channels=1, number_classes=3, variant=None, layers_per_block=1,
                                   growth_rate=2, first_filters=8)
    path = str(tmp_path_factory.mktemp("models") / "gray")
    saved_model.export_saved_model(model, path)
    return saved_model.load_saved_model(path)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_labels_equal_the_mask_inference_writes_for_the_tiff(tmp_path, tiny_model, version):
    import tifffile

    from fcdn.inference import runner as inference_runner
    from fcdn.inference import segmentation, tiling

    predict, metadata = tiny_model
    height, width = 2 * HEIGHT, 2 * WIDTH  # more than one 288x288 tile
    rows, columns = np.mgrid[0:height, 0:width]
    image = (1000 + 800 * np.sin(rows / 9.0) * np.cos(columns / 13.0) + (rows * columns) % 251).astype(np.uint16)
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")  # main() creates it
    tiff = str(tmp_path / "images" / "image.tif")
    tifffile.imwrite(tiff, image)
    tile_size = tiling.check_tile_size(288, metadata["radius"], metadata["size_factor"])
    options = inference_runner.RunnerOptions(tile_size=tile_size, output_folder=str(tmp_path / "masks"))
    inference_runner.segment_file(tiff, predict, metadata, options)  # the TIFF path
    expected = tifffile.imread(str(tmp_path / "masks" / "image.tif"))
    path = write_ome_zarr(tmp_path / "image.zarr", image, "yx", version)
    with ome_zarr_io.ZarrSource.open(path) as source:  # the same steps, from the zarr
        grid = tiling.tile_grid(height, width, tile_size, metadata["radius"], metadata["size_factor"])
        assert grid.tile_count > 1
        mean, std = source.statistics()
        dtype = image_files.mask_dtype(metadata["number_classes"] - 1)
        batch_size = tiling.tiles_per_batch(0, grid.tile_shape, tile_size)
        bands = segmentation.segment_bands(source, grid, predict, mean, std, batch_size, dtype)
        written = ome_zarr_io.write_labels(source, bands, dtype, metadata["number_classes"])
    np.testing.assert_array_equal(zarr.open_array(os.path.join(written.path, "0"))[:], expected)
    assert len(np.unique(expected)) > 1


# ---------------------------------------------------------------------------------------------
# the script, as a user runs it



@pytest.mark.slow
def test_script_writes_labels_into_zarr_images_and_reports_bad_ones(tmp_path, gray_model, mosaic):
    from fcdn.inference import segmentation

    model_path, predict, metadata = gray_model
    images = tmp_path / "images"
    image = mosaic[:500, :420]
    write_ome_zarr(images / "a.zarr", image, "yx", "0.4")
    write_ome_zarr(images / "b.zarr", image[None, None, None], "tczyx", "0.5")
    zarr.open_group(str(images / "plain.zarr"), mode="w", zarr_format=3)  # no OME metadata
    write_ome_zarr(images / "stack.zarr", np.stack([image[:64, :64]] * 3), "zyx", "0.5", scale_factors=())
    common = ["--saved_model_filepath", model_path, "--image_folder", str(images), "--image_format", "zarr",
              "--tile_size", "288"]
    result = run_inference(*common)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "done: 3 image(s) segmented, 1 failed" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any(str(images / "plain.zarr") in line and "multiscales" in line for line in errors), errors
    stack_label = zarr.open_array(str(images / "stack.zarr" / "labels" / "fcdensenet" / "0"))
    assert stack_label.shape == (3, 64, 64)
    np.testing.assert_array_equal(stack_label[1], segmentation.segment_array(image[:64, :64], predict, metadata, 288))
    expected = segmentation.segment_array(image, predict, metadata, 288)
    for name, version in (("a.zarr", "0.4"), ("b.zarr", "0.5")):
        label = images / name / "labels" / "fcdensenet"
        stored = np.asarray(zarr.open_array(str(label / "0"))[:]).reshape(image.shape)
        assert np.array_equal(stored, expected), name
        assert listing(str(images / name)) == ["fcdensenet"]
        VALIDATORS[version][0].from_zarr(zarr.open_group(str(images / name), mode="r"))
        VALIDATORS[version][1].from_zarr(zarr.open_group(str(label), mode="r"))

    again = run_inference(*common, "--label_name", "fcdensenet")
    assert f"note: {images / 'a.zarr' / 'labels' / 'fcdensenet'}: replaced the earlier label image" in again.stdout

    # a read-only image zarr: refused without --output_folder, written elsewhere with it
    shutil.rmtree(images / "plain.zarr")
    shutil.rmtree(images / "stack.zarr")
    with read_only_view(images, tmp_path / "read_only") as read_only:
        refused = run_inference(*[value if value != str(images) else read_only for value in common],
                                "--label_name", "other")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"error: {os.path.join(read_only, 'a.zarr')}: the image zarr is read-only" in refused.stderr
        elsewhere = run_inference(*[value if value != str(images) else read_only for value in common],
                                  "--output_folder", str(tmp_path / "labels"))
        assert elsewhere.returncode == 0, elsewhere.stderr
    assert sorted(os.listdir(tmp_path / "labels")) == ["a.zarr", "b.zarr"]
    assert listing(str(images / "a.zarr")) == ["fcdensenet"]  # nothing was added to the image
