"""The statistics pass and the band reads of a streamed image hold about a band of rows, whatever the
file's strip or chunk layout: measured in a child process (its own peak resident memory), not timed."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from conftest import REPO_ROOT

from fcdn.data import image_sources

SIZE = 8192
MEMORY_BOUND = 400e6
# the statistics pass, then the bands a tile loop reads (1024-row tiles overlapping by 128 rows);
# VmHWM is the child's own peak, unlike ru_maxrss, which starts from the parent's at fork
CHILD = """
import sys
path = sys.argv[1]
if path.endswith(".zarr"):
    from fcdn.data import ome_zarr_io
    source = ome_zarr_io.ZarrSource.open(path)
else:
    from fcdn.data import image_sources
    source = image_sources.open_source(path, 0)
with source:
    mean, std = source.statistics()
    for start in range(0, source.shape[0], 896):
        source.rows(start, min(start + 1024, source.shape[0]))
peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(float(mean[0]), float(std[0]), peak * 1024)
"""


@pytest.fixture(scope="module")
def large_image():
    """SIZE x SIZE uint16 that compresses well (quick to write): column % 251 plus row % 7, whose mean
    and variance are the two terms' sums."""
    columns, rows = np.arange(SIZE) % 251, np.arange(SIZE) % 7
    image = np.add.outer(rows, columns).astype(np.uint16)
    return image, columns.mean() + rows.mean(), np.sqrt(columns.var() + rows.var())


def write_single_block(path, image, kind):
    if kind == "tiff":
        tifffile.imwrite(path, image, compression="zlib", compressionargs={"level": 1}, rowsperstrip=SIZE)
        return path
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("0", data=image, chunks=image.shape, compressors=zarr.codecs.ZstdCodec(level=1))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]}]}
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiff", "zarr"])
def test_a_single_strip_or_chunk_image_is_measured_in_under_400_mb(tmp_path, large_image, kind):
    image, expected_mean, expected_std = large_image
    path = write_single_block(str(tmp_path / ("one.tif" if kind == "tiff" else "one.zarr")), image, kind)
    result = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    mean, std, peak = result.stdout.split()
    np.testing.assert_allclose([float(mean), float(std)], [expected_mean, expected_std], rtol=1e-6)
    assert int(peak) < MEMORY_BOUND, f"{kind}: peak {int(peak) / 1e6:.0f} MB"


def test_a_block_larger_than_the_cap_gives_the_statistics_of_the_whole(monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.normal(1000, 50, (37, 23, 2)).astype(np.float32)
    monkeypatch.setattr(image_sources, "STATISTICS_BLOCK_PIXELS", 50)  # 1 row of 23x2 values a piece
    block = image_sources.ArraySource(image).block_statistics(0, 37)
    assert block.count == 37 * 23
    np.testing.assert_allclose(block.mean, image.mean(axis=(0, 1), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(block.m2, image.astype(np.float64).var(axis=(0, 1)) * 37 * 23, rtol=1e-5)
