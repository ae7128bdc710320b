"""Age buckets: edges, and ages that must be rejected rather than bucketed."""

import numpy as np
import pytest
import torch

from agecgan.ages import BUCKET_LABELS, age_to_bucket, one_hot


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        (1, 0),
        (18, 0),
        (19, 1),
        (29, 1),
        (30, 2),
        (39, 2),
        (40, 3),
        (49, 3),
        (50, 4),
        (59, 4),
        (60, 5),
        (116, 5),
        (np.int64(45), 3),
    ],
)
def test_bucket_edges(age, bucket):
    assert age_to_bucket(age) == bucket


@pytest.mark.parametrize("age", [0, -3])
def test_non_positive_ages_are_rejected(age):
    with pytest.raises(ValueError, match="positive"):
        age_to_bucket(age)


@pytest.mark.parametrize("age", [30.5, "30", True, None])
def test_non_integer_ages_are_rejected(age):
    with pytest.raises(TypeError):
        age_to_bucket(age)


def test_labels_and_one_hot():
    assert BUCKET_LABELS == ("0-18", "19-29", "30-39", "40-49", "50-59", "60+")
    y = one_hot(torch.tensor([0, 5]))
    assert y.tolist() == [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]
