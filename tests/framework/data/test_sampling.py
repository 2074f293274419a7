import itertools

import pytest

from lowbit.data.sampling import GlobalBatchStream, val_indices


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("world,batch", [(2, 4), (3, 2), (4, 1)])
def test_ranks_read_contiguous_slices_of_the_one_process_batch(world, batch):
    steps = 5
    one = _take(GlobalBatchStream(0, world * batch), steps * world * batch)
    ranks = [_take(GlobalBatchStream(0, batch, r, world), steps * batch) for r in range(world)]
    for s in range(steps):
        step = [i for r in range(world) for i in ranks[r][s * batch : (s + 1) * batch]]  # rank order
        assert step == one[s * world * batch : (s + 1) * world * batch]


def test_a_resumed_stream_continues_where_the_rank_stopped():
    full = _take(GlobalBatchStream(0, 4, rank=1, world=2), 20)
    assert _take(GlobalBatchStream(12, 4, rank=1, world=2), 8) == full[12:]
    assert full[:6] == [4, 5, 6, 7, 12, 13]


def test_validation_shards_are_equal_or_the_whole_set():
    assert [val_indices(8, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert val_indices(7, 1, 2) == list(range(7))  # uneven: every rank evaluates everything
    assert val_indices(5, 0, 1) == list(range(5))
