"""The endless sampler of training counted in iterations (segmentation): rounds cut from a stream of data epochs."""
from torch.utils.data import DistributedSampler

from mcbeit.data.samplers import StreamSampler


def _rounds(sampler, n):
    out = []
    for r in range(n):
        sampler.set_epoch(r)
        out += list(sampler)
    return out


def test_rounds_are_consecutive_cuts_of_the_data_epochs_in_order():
    """Rounds of 7 over 10 images: the stream is DistributedSampler's epoch 0, then epoch 1, ... with no seam."""
    stream = _rounds(StreamSampler(10, 7, seed=3), 6)                   # 42 samples: 4 data epochs and 2
    expected = []
    for epoch in range(5):
        sampler = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        expected += [(int(i), epoch) for i in sampler]
    assert stream == expected[:42]


def test_a_resumed_round_continues_where_the_uninterrupted_one_was():
    whole = _rounds(StreamSampler(10, 7, seed=0), 5)
    sampler = StreamSampler(10, 7, seed=0)
    sampler.set_epoch(2, start=5)                                      # mid-round, across a data-epoch boundary
    assert list(sampler) == whole[14 + 5:21] and len(sampler) == 2


def test_ranks_share_each_data_epoch_and_every_rank_has_samples_however_few_images():
    ranks = [_rounds(StreamSampler(5, 4, world_size=2, rank=r, seed=1), 3) for r in range(2)]
    per_epoch = {}
    for stream in ranks:
        assert len(stream) == 12
        for index, epoch in stream:
            per_epoch.setdefault(epoch, []).append(index)
    assert set(per_epoch[0]) == set(range(5))                          # one pass: every image (one padded twice)
    one = StreamSampler(1, 3, world_size=2, rank=1)                     # one image, two processes
    one.set_epoch(0)
    assert [i for i, _ in one] == [0, 0, 0]
