"""Training-time augmentation: reflection, rotation, jitter, scale, noise, blur and intensity.

The reference ran two full warps per image (rotate, then translate + scale) and flipped afterwards.
Here the geometry is one affine matrix (reflections, rotation about the centre, scale, translation)
applied once: bilinear with reflect borders for the image, nearest neighbour for the mask, so the
mask only ever holds classes that were in the input. Parameters are drawn from an explicit
`np.random.Generator`, which makes every augmentation reproducible from a seed.

    config = AugmentationConfig.from_json("augmentation.json")
    image, mask = augment(image, mask, config, np.random.default_rng(0))
"""

import dataclasses
import json
import math

import numpy as np
import scipy.ndimage
import skimage.transform

try:  # scikit-image's compiled affine warp; the public `warp` only uses it for orders 1 and 3
    from skimage.transform._warps_cy import _warp_fast
except ImportError:  # private module moved: fall back to the numpy nearest-neighbour path
    _warp_fast = None

try:  # optional: OpenCV's warp and blur are several times faster (bench/bench_augment.py)
    import cv2
except ImportError:
    cv2 = None

BACKENDS = ("scikit-image",) + (("opencv",) if cv2 is not None else ())
DEFAULT_BACKEND = BACKENDS[-1]
_CV2_MAX_CHANNELS = 4  # OpenCV warps and blurs up to 4 channels in one call

_BOOL_FIELDS = ("reflection", "rotation")
_FLOAT_FIELDS = (
    "jitter_severity", "noise_severity", "scale_severity", "blur_max_sigma", "intensity_severity",
)


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Augmentation settings; the defaults are the ones the reference hard-coded.

    jitter_severity: largest translation as a fraction of the image size.
    noise_severity: largest Gaussian noise sigma as a fraction of the image's dynamic range.
    scale_severity: each axis is scaled by a factor in [1 - s, 1 + s].
    blur_max_sigma: blur sigma is drawn in [-m, m]; the image is blurred only when it is > 0.
    intensity_severity: largest additive shift as a fraction of the image's dynamic range.
    """

    reflection: bool = True
    rotation: bool = True
    jitter_severity: float = 0.1
    noise_severity: float = 0.02
    scale_severity: float = 0.1
    blur_max_sigma: float = 2.0
    intensity_severity: float = 0.0

    def __post_init__(self):
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"{name}: expected a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.scale_severity >= 1:
            raise ValueError(f"scale_severity: must be below 1 (scale factors stay positive), "
                             f"got {self.scale_severity!r}")

    @classmethod
    def from_json(cls, path):
        """Settings from a JSON object; absent keys keep their defaults. ValueError names the file."""
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except OSError as error:
            raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of augmentation settings")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r} (known keys: {', '.join(known)})")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AugmentationParameters:
    """One draw of augmentation parameters. The identity is the default."""

    reflect_x: bool = False
    reflect_y: bool = False
    angle: float = 0.0  # degrees, counter-clockwise as displayed (as np.rot90 and skimage rotate)
    translate_x: int = 0  # pixels
    translate_y: int = 0
    scale_x: float = 1.0
    scale_y: float = 1.0
    noise_fraction: float = 0.0  # noise sigma as a fraction of the dynamic range (sign irrelevant)
    blur_sigma: float = 0.0  # blur only when > 0
    intensity_fraction: float = 0.0  # additive shift as a fraction of the dynamic range

    def is_geometric_identity(self):
        return (not self.reflect_x and not self.reflect_y and self.angle % 360 == 0
                and self.translate_x == 0 and self.translate_y == 0
                and self.scale_x == 1 and self.scale_y == 1)


def _random_sign(rng):
    return 1 if rng.random() < 0.5 else -1


def draw_parameters(config, image_shape, rng):
    """Fresh parameters for one image of `image_shape` (H, W[, C]), with the reference's distributions."""
    height, width = image_shape[0], image_shape[1]
    values = {}
    if config.reflection:
        values["reflect_x"] = bool(rng.random() < 0.5)
        values["reflect_y"] = bool(rng.random() < 0.5)
    if config.rotation:
        values["angle"] = float(rng.uniform(0.0, 360.0))
    if config.jitter_severity > 0:
        values["translate_x"] = _random_sign(rng) * int(config.jitter_severity * width * rng.random())
        values["translate_y"] = _random_sign(rng) * int(config.jitter_severity * height * rng.random())
    if config.scale_severity > 0:
        low, high = 1.0 - config.scale_severity, 1.0 + config.scale_severity
        values["scale_x"] = float(rng.uniform(low, high))
        values["scale_y"] = float(rng.uniform(low, high))
    if config.noise_severity > 0:
        values["noise_fraction"] = float(rng.uniform(-config.noise_severity, config.noise_severity))
    if config.blur_max_sigma > 0:
        values["blur_sigma"] = float(rng.uniform(-config.blur_max_sigma, config.blur_max_sigma))
    if config.intensity_severity > 0:
        values["intensity_fraction"] = _random_sign(rng) * config.intensity_severity * float(rng.random())
    return AugmentationParameters(**values)


def _snap(value):
    """cos/sin of multiples of 90 degrees exactly, so quarter turns move whole pixels."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < 1e-12 else value


def inverse_matrix(parameters, height, width):
    """3x3 map from output (x, y) to input (x, y), pixel centres at integers.

    Forward: p_out = c + t + R S M (p_in - c) with c = ((W-1)/2, (H-1)/2), M the reflections,
    S the scales, R the rotation; the warp needs the inverse.
    """
    theta = math.radians(parameters.angle)
    cos, sin = _snap(math.cos(theta)), _snap(math.sin(theta))
    # image rows grow downwards, so a counter-clockwise turn on screen has this sign pattern
    rotation = np.array([[cos, sin], [-sin, cos]])
    scale = np.diag([parameters.scale_x, parameters.scale_y])
    reflection = np.diag([-1.0 if parameters.reflect_x else 1.0, -1.0 if parameters.reflect_y else 1.0])
    linear = reflection @ np.linalg.inv(scale) @ rotation.T
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    shift = np.array([parameters.translate_x, parameters.translate_y], dtype=np.float64)
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre - linear @ (centre + shift)
    return matrix


def _reflect_indices(indices, size):
    """Mirror integer indices about the first and last pixel centres (numpy 'reflect')."""
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * (size - 1)
    indices %= period
    np.subtract(period, indices, out=indices, where=indices >= size)
    return indices


def _nearest_warp_numpy(mask, matrix):
    height, width = mask.shape
    xs = np.arange(width, dtype=np.float64)[np.newaxis, :]
    ys = np.arange(height, dtype=np.float64)[:, np.newaxis]
    source_x = np.floor(matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] + 0.5).astype(np.intp)
    source_y = np.floor(matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] + 0.5).astype(np.intp)
    flat = _reflect_indices(source_y, height) * width + _reflect_indices(source_x, width)
    return mask.ravel().take(flat)


def warp_mask(mask, matrix, backend=DEFAULT_BACKEND):
    """Nearest-neighbour warp of an HW class map with reflect borders; keeps the dtype and classes."""
    if backend == "opencv" and mask.dtype in (np.uint8, np.uint16, np.int16):
        return cv2.warpAffine(np.ascontiguousarray(mask), matrix[:2], (mask.shape[1], mask.shape[0]),
                              flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT_101)
    # float32 holds integers exactly up to 2**24; beyond that only the numpy path is exact
    small = mask.dtype.itemsize <= 2 or (mask.size and np.abs(mask).max() < 2 ** 24)
    if _warp_fast is None or not small:
        return _nearest_warp_numpy(mask, matrix)
    warped = _warp_fast["float32_t"](np.ascontiguousarray(mask, dtype=np.float32),
                                     matrix.astype(np.float32), order=0, mode="reflect")
    return np.asarray(warped).astype(mask.dtype)


def _per_channel_cv2(function, image):
    """Apply an OpenCV function to an HWC image, in groups of channels it accepts."""
    parts = [function(np.ascontiguousarray(image[:, :, i:i + _CV2_MAX_CHANNELS]))
             for i in range(0, image.shape[2], _CV2_MAX_CHANNELS)]
    parts = [part[:, :, np.newaxis] if part.ndim == 2 else part for part in parts]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def warp_image(image, matrix, backend=DEFAULT_BACKEND):
    """Bilinear warp of an HWC float32 image with reflect borders."""
    if backend == "opencv":
        size = (image.shape[1], image.shape[0])
        return _per_channel_cv2(
            lambda part: cv2.warpAffine(part, matrix[:2], size,
                                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                        borderMode=cv2.BORDER_REFLECT_101), image)
    warped = skimage.transform.warp(image, matrix, order=1, mode="reflect", preserve_range=True,
                                    clip=False)
    return np.asarray(warped, dtype=np.float32)


def blur_image(image, sigma, backend=DEFAULT_BACKEND):
    """Gaussian blur of each channel of an HWC float32 image (half-sample symmetric borders)."""
    if backend == "opencv":
        # sigma * 8 + 1 taps: the same 4-sigma truncation as scipy
        return _per_channel_cv2(
            lambda part: cv2.GaussianBlur(part, (0, 0), sigma, borderType=cv2.BORDER_REFLECT), image)
    return scipy.ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect", output=np.float32)


def apply_parameters(image, mask, parameters, rng, backend=DEFAULT_BACKEND):
    """Apply one draw to an HWC image (any numeric type) and an HW mask (or None).

    Returns (float32 HWC image, mask of the input's dtype or None). `rng` supplies the noise.
    `backend` is one of BACKENDS: "opencv" when it is installed, else "scikit-image" (scikit-image
    warp, scipy blur); they agree to interpolation rounding (OpenCV warps with 1/32-pixel steps).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    image = image.astype(np.float32, copy=False)
    height, width = image.shape[:2]
    if not parameters.is_geometric_identity():
        matrix = inverse_matrix(parameters, height, width)
        image = warp_image(image, matrix, backend)
        if mask is not None:
            mask = warp_mask(np.asarray(mask), matrix, backend)
    needs_range = parameters.noise_fraction != 0 or parameters.intensity_fraction != 0
    dynamic_range = float(image.max() - image.min()) if needs_range and image.size else 0.0
    if parameters.noise_fraction != 0 and dynamic_range > 0:
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        noise *= np.float32(parameters.noise_fraction * dynamic_range)
        image = image + noise
    if parameters.blur_sigma > 0:
        image = blur_image(image, parameters.blur_sigma, backend)
    if parameters.intensity_fraction != 0:
        image = image + np.float32(parameters.intensity_fraction * dynamic_range)
    return image, mask


def augment(image, mask, config, rng, backend=DEFAULT_BACKEND):
    """Augment one example with fresh parameters: (float32 HWC image, mask of the input's dtype)."""
    parameters = draw_parameters(config, np.shape(image), rng)
    return apply_parameters(image, mask, parameters, rng, backend)


def augment_image(img, mask=None, rotation_flag=False, reflection_flag=False,
                  jitter_augmentation_severity=0, noise_augmentation_severity=0,
                  scale_augmentation_severity=0, blur_augmentation_max_sigma=0,
                  intensity_augmentation_severity=0, rng=None):
    """The reference's entry point: returns (image, mask); with no flags, its input unchanged.

    With any augmentation on, the image comes back float32 with the input's number of dimensions.
    """
    config = AugmentationConfig(
        reflection=bool(reflection_flag),
        rotation=bool(rotation_flag),
        jitter_severity=jitter_augmentation_severity,
        noise_severity=noise_augmentation_severity,
        scale_severity=scale_augmentation_severity,
        blur_max_sigma=blur_augmentation_max_sigma,
        intensity_severity=intensity_augmentation_severity,
    )
    if config == AugmentationConfig(False, False, 0, 0, 0, 0, 0):
        return img, mask
    rng = np.random.default_rng() if rng is None else rng
    image, mask = augment(img, mask, config, rng)
    if np.ndim(img) == 2:
        image = image[:, :, 0]
    return image, mask
