import numpy as np
import pytest

from fcdn.common.segmentation_metrics import confusion_matrix, segmentation_metrics


def test_segmentation_metrics():
    confusion = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2 absent everywhere
    accuracy, iou, mean_iou = segmentation_metrics(confusion)
    assert accuracy == pytest.approx(7 / 10)
    assert iou[0] == pytest.approx(5 / 8) and iou[1] == pytest.approx(2 / 5) and np.isnan(iou[2])
    assert mean_iou == pytest.approx((5 / 8 + 2 / 5) / 2)


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = np.array([[0, 0, 1], [1, 2, 2]], dtype=np.uint8)
    predictions = np.array([[0, 1, 1], [0, 2, 1]], dtype=np.uint8)
    confusion = confusion_matrix(labels, predictions, 3)
    assert confusion.tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert confusion.sum() == labels.size


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="class 3"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
