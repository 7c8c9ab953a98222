"""Users' image and mask files: reading them, their pixel types, and the normalisation shared by
training and inference."""

import os

import numpy as np

IMAGE_EXTENSIONS = ("tif", "tiff", "png", "jpg", "jpeg")
IMAGE_DTYPES = (np.uint8, np.uint16, np.int32, np.float32)
MASK_DTYPES = (np.uint8, np.uint16, np.int32)


class ImageFileError(ValueError):
    """A file that cannot be used; the message names the file and the problem."""


def normalize_extension(image_format):
    """'tif', '.tif' and 'TIF' all mean 'tif'; anything unsupported is a ValueError."""
    extension = image_format.lstrip(".").lower()
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"image format '{image_format}' is not one of {', '.join(IMAGE_EXTENSIONS)}")
    return extension


def list_images(folder, image_format):
    """Sorted file names in `folder` ending in `.{image_format}` (case-insensitive).

    Hidden files are left out: the temporaries of an unfinished writer and macOS's `._name` files.
    """
    extension = "." + normalize_extension(image_format)
    if not os.path.isdir(folder):
        raise ImageFileError(f"{folder}: folder does not exist")
    return sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(extension) and not name.startswith(".")
        and os.path.isfile(os.path.join(folder, name))
    )


def read_image(path):
    """Decode a tif/png/jpg file into a numpy array (HW or HWC); ImageFileError if it cannot, or if it
    is a stack of planes (image_axes reads those). A TIFF is read by its axes (image_axes)."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension in ("tif", "tiff"):
        return _read_tiff_image(path)
    try:
        import imageio.v3 as iio

        array = iio.imread(path)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file does not exist") from None
    except Exception as error:  # decoders raise many types for a corrupt file
        raise ImageFileError(f"{path}: cannot decode ({type(error).__name__}: {error})") from None
    array = np.asarray(array)
    if array.ndim not in (2, 3) or array.size == 0:
        raise ImageFileError(f"{path}: expected a 2-D image (HW or HWC), got shape {array.shape}")
    return array


def _read_tiff_image(path):
    from fcdn.data import image_axes

    with image_axes.TiffStack(path) as stack:
        layout = stack.layout
        if layout.planes > 1:
            raise ImageFileError(f"{path}: a stack of {layout.planes} planes ({layout.describe()}), "
                                 f"not one 2-D image")
        array = stack.read()
    if array.size == 0:
        raise ImageFileError(f"{path}: expected a 2-D image (HW or HWC), got shape {array.shape}")
    plane = layout.plane(array, 0)
    return plane if layout.channel is not None else plane[:, :, 0]


def as_supported_image(array, path):
    """Convert an image to a supported pixel type when that is lossless, else ImageFileError."""
    if array.dtype in IMAGE_DTYPES:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int8, np.int16):
        return array.astype(np.int32)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype == np.float64:
        converted = array.astype(np.float32)
        if np.all(np.isfinite(converted) == np.isfinite(array)):
            return converted
    if array.dtype in (np.uint32, np.int64, np.uint64) and array.size:
        if array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
    raise ImageFileError(
        f"{path}: pixel type {array.dtype} cannot be converted safely to uint8, uint16, int32 or float32"
    )


def non_finite_pixels(image):
    """How many pixels of an image (HW or HWC) hold NaN or Inf in any channel; none can in an integer one."""
    if not np.issubdtype(image.dtype, np.floating):
        return 0
    bad = ~np.isfinite(image)
    return int(np.count_nonzero(bad.any(axis=2) if bad.ndim == 3 else bad))


def check_finite(path, count):
    """ImageFileError when `count` pixels of the image at `path` are NaN or Inf: no normalisation, so no
    training or segmentation, can be made of them."""
    if count:
        raise ImageFileError(f"{'the image' if path is None else path}: {count} pixel(s) hold NaN or Inf values")


def mask_dtype(largest_class):
    """The one rule for a mask's pixel type: the smallest of uint8, uint16 and int32 that holds
    `largest_class`. Databases, the reader and inference all store masks this way."""
    for dtype in MASK_DTYPES:
        if largest_class <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"class {largest_class} is more than int32 can store")


def as_mask(mask, path):
    """A user's mask as a single-channel integer class map in mask_dtype of its largest class."""
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ImageFileError(f"{path}: mask has shape {mask.shape}; masks must be single-channel")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ImageFileError(f"{path}: mask pixel type {mask.dtype} is not an integer type (masks hold classes)")
    low, high = int(mask.min()), int(mask.max())
    if low < 0:
        raise ImageFileError(f"{path}: mask holds negative values (min {low}); classes must be >= 0")
    try:
        return mask.astype(mask_dtype(high), copy=False)
    except ValueError:
        raise ImageFileError(f"{path}: mask holds class {high}, more than int32 can store") from None


def zscore_normalize(image, mean=None, std=None):
    """Per-channel z-score of an HWC image as float32; only the mean is removed where std <= 1.

    `mean` and `std` (one value per channel) may be given when they were computed elsewhere, for
    instance in a streaming pass over an image too large for memory.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if mean is None or std is None:
        mean = image.mean(axis=(0, 1), dtype=np.float64)
        std = image.std(axis=(0, 1), dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float32)
    scale = np.where(np.asarray(std) > 1.0, np.asarray(std), 1.0).astype(np.float32)
    return (image - mean) / scale
