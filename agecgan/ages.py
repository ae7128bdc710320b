"""The six Age-cGAN age buckets and the one-hot age condition y."""

import operator

import torch

# Inclusive age ranges of the buckets; the last one is open-ended.
AGE_BUCKETS: tuple[tuple[int, int | None], ...] = (
    (0, 18),
    (19, 29),
    (30, 39),
    (40, 49),
    (50, 59),
    (60, None),
)
BUCKET_LABELS: tuple[str, ...] = tuple(
    f"{low}-{high}" if high is not None else f"{low}+" for low, high in AGE_BUCKETS
)
NUM_BUCKETS = len(AGE_BUCKETS)


def age_to_bucket(age: int) -> int:
    """Index of the bucket holding `age` in whole years; ages <= 0 are rejected, not bucketed."""
    if isinstance(age, bool):
        raise TypeError("age must be an integer number of years, got a bool")
    age = operator.index(age)  # accepts numpy integers, refuses floats and strings
    if age <= 0:
        raise ValueError(f"age must be a positive number of years, got {age}")
    for index, (_, high) in enumerate(AGE_BUCKETS):
        if high is None or age <= high:
            return index
    raise AssertionError("unreachable: the last bucket is open-ended")


def one_hot(buckets: torch.Tensor) -> torch.Tensor:
    """Bucket indices (N,) -> the age condition y (N, 6) as float."""
    return torch.nn.functional.one_hot(buckets.long(), NUM_BUCKETS).float()
