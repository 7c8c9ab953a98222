"""Pictures to check results by eye: mask outlines over the image, training curves, test predictions.

    overlay = Overlay(height, width, channels)   # downscaled so the long side is at most 2048
    for start, image_band, mask_band in bands:
        overlay.add(start, image_band, mask_band)
    write_png("qc/slide.png", overlay.render())
    write_training_curves("runs/x/training_curves.png", history)

Outlines: the pixels of a class that touch (4-neighbourhood) a pixel of another class, drawn for every
class but the background (0) in its own colour of PALETTE; with more classes than colours the colours
cycle. Images are contrast-stretched per channel between their 0.5 and 99.5 percentiles: one channel
grey, three as RGB, any other count shows its first channel.
"""

import numpy as np

import atomic_files

MAX_SIDE = 2048
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
# Distinct colours for outlines on grey or colour images (red first: it stands out on phase contrast).
PALETTE = np.array([
    (230, 25, 75), (255, 225, 25), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
], dtype=np.uint8)


def class_colour(class_index):
    """The outline colour of a class (1, 2, ...); colours cycle after len(PALETTE) classes."""
    return PALETTE[(class_index - 1) % len(PALETTE)]


def colours_cycle(number_classes):
    return number_classes - 1 > len(PALETTE)


def stride_for(height, width, max_side=MAX_SIDE):
    """Keep every stride-th row and column, so the long side is at most max_side."""
    return max(1, -(-max(height, width) // max_side))


def stretch(image):
    """uint8 RGB of an HWC image: per-channel 0.5-99.5 percentile stretch, grey or RGB."""
    channels = image.shape[2]
    shown = image if channels == 3 else image[:, :, :1]
    shown = shown.astype(np.float32)
    low = np.percentile(shown, LOW_PERCENTILE, axis=(0, 1))
    high = np.percentile(shown, HIGH_PERCENTILE, axis=(0, 1))
    scale = np.where(high > low, high - low, 1.0)
    scaled = np.clip((shown - low) / scale, 0.0, 1.0)
    rgb = (scaled * 255 + 0.5).astype(np.uint8)
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb


def outlines(mask):
    """Boolean map of the pixels that touch a pixel of another class (4-neighbourhood)."""
    edge = np.zeros(mask.shape, bool)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    return edge


def draw_outlines(rgb, mask):
    """The RGB image with every non-background class's outline in its colour."""
    picture = rgb.copy()
    edge = outlines(mask)
    for class_index in np.unique(mask[edge]):
        if class_index != 0:
            picture[edge & (mask == class_index)] = class_colour(int(class_index))
    return picture


class Overlay:
    """An outline overlay built from bands of rows, keeping only every stride-th row and column."""

    def __init__(self, height, width, channels, max_side=MAX_SIDE):
        self.stride = stride_for(height, width, max_side)
        rows, columns = -(-height // self.stride), -(-width // self.stride)
        self.image = np.zeros((rows, columns, channels), np.float32)
        self.mask = np.zeros((rows, columns), np.int64)

    def add(self, start, image_band, mask_band):
        """Rows [start, start + len(mask_band)) of the image (HWC) and of its mask."""
        first = -(-start // self.stride) * self.stride - start  # first kept row inside the band
        kept_image = image_band[first::self.stride, ::self.stride]
        kept_mask = mask_band[first::self.stride, ::self.stride]
        row = (start + first) // self.stride
        self.image[row:row + len(kept_mask)] = kept_image
        self.mask[row:row + len(kept_mask)] = kept_mask

    def render(self):
        return draw_outlines(stretch(self.image), self.mask)


def write_png(path, picture):
    """Write an RGB picture as PNG, atomically."""
    import imageio.v3 as iio

    with atomic_files.replacing_file(path) as temporary:
        iio.imwrite(temporary, picture, extension=".png")
