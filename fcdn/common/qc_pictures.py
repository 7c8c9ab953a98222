"""Pictures to check results by eye: mask outlines over the image, training curves, test predictions.

    overlay = Overlay(height, width, channels)   # downscaled so the long side is at most 2048
    for start, image_band, mask_band in bands:
        overlay.add(start, image_band, mask_band)
    write_png("qc/slide.png", overlay.render())
    write_training_curves("runs/x/training_curves.png", history, best_epoch)

Outlines: the pixels of a class that touch (4-neighbourhood) a pixel of another class, drawn for every
class but the background (0) in its own colour of PALETTE; with more classes than colours the colours
cycle. Images are contrast-stretched per channel between their 0.5 and 99.5 percentiles: one channel
grey, three as RGB, any other count shows its first channel.
"""

import numpy as np

from fcdn.common import atomic_files

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


# ---------------------------------------------------------------------------------------------
# training pictures (matplotlib, without a display)


def _figure(rows, columns, size):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    from matplotlib import pyplot

    return pyplot, pyplot.subplots(rows, columns, figsize=size, squeeze=False)


def _save_figure(pyplot, figure, path):
    with atomic_files.replacing_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)


def write_training_curves(path, history, best_epoch):
    """training_curves.png: losses, pixel accuracy, mean IoU, IoU per class and the learning rate
    against the epoch.

    `history` holds the trainer's test-pass entries (epoch, test_loss, pixel_accuracy, mean_iou,
    iou per class, and train_loss and learning_rate where recorded: runs from before they were
    recorded lack them); the best epoch is marked on every panel.
    """
    pyplot, (figure, axes) = _figure(1, 4, (20, 4.2))
    epochs = [entry["epoch"] for entry in history]
    loss_axis, score_axis, class_axis, rate_axis = axes[0]
    _plot_recorded(loss_axis, history, "train_loss", label="train loss")
    loss_axis.plot(epochs, [entry["test_loss"] for entry in history], marker="o", label="test loss")
    loss_axis.set_title("loss")
    score_axis.plot(epochs, [entry["pixel_accuracy"] for entry in history], marker="o", label="pixel accuracy")
    score_axis.plot(epochs, [entry["mean_iou"] for entry in history], marker="o", label="mean IoU")
    score_axis.set_title("test scores")
    for index in range(len(history[-1]["iou"])):
        values = [entry["iou"][index] for entry in history]
        colour = "0.4" if index == 0 else PALETTE[(index - 1) % len(PALETTE)] / 255.0
        class_axis.plot(epochs, [np.nan if value is None else value for value in values], marker="o",
                        color=colour, label=f"class {index}")
    class_axis.set_title("test IoU per class")
    rate_axis.set_title("learning rate")
    plotted = [loss_axis, score_axis, class_axis]
    if _plot_recorded(rate_axis, history, "learning_rate", label="mean of the epoch", color="0.3"):
        rate_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        plotted.append(rate_axis)
    else:
        rate_axis.axis("off")
        rate_axis.text(0.5, 0.5, "not recorded\n(a run from before it was)", ha="center", va="center",
                       transform=rate_axis.transAxes, color="0.4")
    from matplotlib.ticker import MaxNLocator

    for axis in plotted:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch is not None:
            axis.axvline(best_epoch, color="0.6", linestyle="--", label=f"best epoch ({best_epoch})")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    _save_figure(pyplot, figure, path)


def _plot_recorded(axis, history, key, **style):
    """Plot `key` against the epoch for the entries that recorded it; False if none did."""
    points = [(entry["epoch"], entry[key]) for entry in history if entry.get(key) is not None]
    if points:
        axis.plot(*zip(*points), marker="o", **style)
    return bool(points)


def write_test_predictions(path, examples, title):
    """test_predictions.png: each (name, HWC image, true mask, predicted mask) with both outlines.

    True outlines are white, predicted ones in their class's colour, over the stretched image.
    """
    columns = min(4, len(examples))
    rows = -(-len(examples) // columns)
    pyplot, (figure, axes) = _figure(rows, columns, (4 * columns, 4.5 * rows))
    for axis in axes.flat:
        axis.axis("off")
    for axis, (name, image, truth, predicted) in zip(axes.flat, examples):
        picture = draw_outlines(stretch(image.astype(np.float32)), predicted)
        picture[outlines(truth) & (truth != 0)] = 255
        axis.imshow(picture, interpolation="nearest")
        agree = float(np.mean(truth == predicted))
        # a file name is plain text: matplotlib would read a `$...$` in it as mathematics (or fail on it),
        # and TeX its backslashes and braces
        axis.set_title(f"{name}\npixel accuracy {agree:.3f}", fontsize="small", usetex=False,
                       parse_math=False)
    figure.suptitle(f"{title}: true outlines white, predicted in colour")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    _save_figure(pyplot, figure, path)
