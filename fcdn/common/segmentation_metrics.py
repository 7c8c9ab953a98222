"""Scores of a segmentation against its ground truth, shared by the trainer and inference."""

import numpy as np


def confusion_matrix(labels, predictions, number_classes):
    """Pixel counts: rows are true classes, columns predicted ones; labels outside the range are a ValueError."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= number_classes):
        raise ValueError(f"mask holds class {labels.max() if labels.max() >= number_classes else labels.min()}, "
                         f"outside [0, {number_classes})")
    counts = np.bincount(labels * number_classes + predictions, minlength=number_classes ** 2)
    return counts.reshape(number_classes, number_classes)


def segmentation_metrics(confusion):
    """Pixel accuracy, per-class IoU (NaN for a class absent from labels and predictions) and mean IoU
    (over the classes with an IoU) of a confusion matrix (rows: true class, columns: predicted)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = confusion.sum()
    accuracy = float(true_positive.sum() / total) if total else float("nan")
    mean_iou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
    return accuracy, iou, mean_iou
