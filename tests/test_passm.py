"""The block partition of ``passm`` (no processes): contiguous, complete, balanced."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daso.errors import ConfigError
from daso.models import build_model
from daso.strategies.passm import partition_blocks


def check_partition(numels: list[int], k: int) -> list[tuple[int, int]]:
    blocks = partition_blocks(numels, k)
    assert len(blocks) == k
    covered = [i for start, stop in blocks for i in range(start, stop)]
    assert covered == list(range(len(numels)))  # every tensor once, in parameters() order
    assert all(stop > start for start, stop in blocks)
    total, largest = sum(numels), max(numels)
    for start, stop in blocks:
        assert abs(sum(numels[start:stop]) - total / k) <= largest
    return blocks


@given(
    numels=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=40),
    k=st.integers(min_value=1, max_value=8),
)
def test_blocks_cover_every_element_once_in_order_and_balanced(numels, k):
    if k > len(numels):
        with pytest.raises(ConfigError, match="fewer ranks per node"):
            partition_blocks(numels, k)
    else:
        check_partition(numels, k)


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet20"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_blocks_of_the_real_models(name, k):
    numels = [p.numel() for p in build_model(name).parameters()]
    check_partition(numels, k)


def test_equal_tensors_split_evenly():
    assert partition_blocks([5] * 6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert partition_blocks([1, 1, 100], 2) == [(0, 2), (2, 3)]
