"""Property tests of the batch samplers (section 1 of docs/method.md).

The expected batches are rebuilt here from the definition, not from the sampler's helpers: an epoch's global
order `G` (the permutation, padded by wrapping around or cut for `drop_last`) is cut into groups of
`num_replicas * half` indices, rank `r` takes the `r`-th half of every group, and the per-rank half-batches of
all epochs form one stream `s_0, s_1, ...` with batch `t = s_t + s_{t+1}` belonging to the epoch of its
second half. For shuffled samplers `G` is unknown, so it is reconstructed from what all ranks yield and then
checked to be a permutation (plus wrap-around padding) shared by every rank.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from raysdpb.sampler import OverlapBatchSampler, ShuffledBatchSampler

SETTINGS = settings(max_examples=int(os.environ.get("RAYSDPB_HYPOTHESIS_EXAMPLES", 60)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- independent reference ------------------------------------------------------------------------------------

def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def overlap_groups(n: int, half: int, replicas: int, drop_last: bool) -> int:
    group = replicas * half
    return n // group if drop_last else ceil_div(n, group)


def padded(order: list[int], length: int) -> list[int]:
    """`order` cut or padded to `length` by wrapping around (DistributedSampler's padding)."""
    return [order[j % len(order)] for j in range(length)]


def ref_halves(global_order: list[int], half: int, replicas: int, rank: int) -> list[list[int]]:
    groups = len(global_order) // (replicas * half)
    return [global_order[(g * replicas + rank) * half:(g * replicas + rank + 1) * half] for g in range(groups)]


def ref_overlap_epochs(halves_per_epoch: list[list[list[int]]]) -> list[list[list[int]]]:
    """Batches of each epoch from the per-epoch half-batches of one rank (one continuous stream)."""
    stream, owner = [], []
    for e, halves in enumerate(halves_per_epoch):
        stream += halves
        owner += [e] * len(halves)
    out: list[list[list[int]]] = [[] for _ in halves_per_epoch]
    for t in range(len(stream) - 1):
        out[owner[t + 1]].append(stream[t] + stream[t + 1])
    return out


def iterate_epochs(sampler, epochs: int) -> list[list[list[int]]]:
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        batches = [list(b) for b in sampler]
        assert len(sampler) == len(batches), (e, len(sampler), len(batches))
        out.append(batches)
    return out


def overlap_samplers(n, batch_size, replicas, **kw):
    return [OverlapBatchSampler(n, batch_size, num_replicas=replicas, rank=r, **kw) for r in range(replicas)]


def overlap_rank_halves(batches_per_epoch: list[list[list[int]]], half: int) -> list[list[list[int]]]:
    """The half-batches each epoch contributed to the stream, read back from the batches."""
    out = []
    for e, batches in enumerate(batches_per_epoch):
        halves = [b[half:] for b in batches]
        if e == 0:
            halves = [batches[0][:half]] + halves
        out.append(halves)
    return out


def interleave(per_rank: list[list[list[int]]], half: int) -> list[int]:
    """The global order from every rank's half-batches of one epoch (rank r has slice r of each group)."""
    groups = len(per_rank[0])
    assert all(len(h) == groups for h in per_rank)
    order = []
    for g in range(groups):
        for r in range(len(per_rank)):
            assert len(per_rank[r][g]) == half
            order += per_rank[r][g]
    return order


def check_global_order(order: list[int], n: int, group: int, drop_last: bool) -> None:
    """`order` is one permutation of 0..n-1, cut (drop_last) or padded by wrapping around."""
    if drop_last:
        assert len(order) == (n // group) * group
        assert len(set(order)) == len(order), "a sample is drawn twice in an epoch with drop_last=True"
        assert 0 <= n - len(order) < group, "drop_last dropped too many samples"
        assert all(0 <= i < n for i in order)
    else:
        assert len(order) == ceil_div(n, group) * group
        assert sorted(order[:n]) == list(range(n)), "not every sample is seen in the epoch"
        assert order[n:] == order[:len(order) - n], "padding is not a wrap-around of the epoch's own order"


# --- strategies ----------------------------------------------------------------------------------------------

@st.composite
def overlap_config(draw):
    half = draw(st.integers(1, 5))
    replicas = draw(st.integers(1, 4))
    n = draw(st.integers(2 * half * replicas, 2 * half * replicas + 40))
    return dict(n=n, batch_size=2 * half, replicas=replicas, shuffle=draw(st.booleans()),
                drop_last=draw(st.booleans()), seed=draw(st.integers(0, 3)), epochs=draw(st.integers(1, 4)))


# --- OverlapBatchSampler -------------------------------------------------------------------------------------

@SETTINGS
@given(overlap_config())
def test_overlap_stream_matches_definition(cfg):
    n, bs, replicas, epochs = cfg["n"], cfg["batch_size"], cfg["replicas"], cfg["epochs"]
    half = bs // 2
    samplers = overlap_samplers(n, bs, replicas, shuffle=cfg["shuffle"], seed=cfg["seed"], drop_last=cfg["drop_last"])
    per_rank = [iterate_epochs(s, epochs) for s in samplers]
    groups = overlap_groups(n, half, replicas, cfg["drop_last"])

    for rank, epochs_batches in enumerate(per_rank):
        flat = [b for ep in epochs_batches for b in ep]
        # every batch is full, and its first half is the previous batch's second half, across epochs too
        assert all(len(b) == bs for b in flat)
        for prev, cur in zip(flat, flat[1:]):
            assert cur[:half] == prev[half:]
        # the first epoch has halves - 1 batches, the later ones halves
        assert [len(ep) for ep in epochs_batches] == [groups - 1] + [groups] * (epochs - 1)
        assert samplers[rank].total_batches(epochs) == len(flat)
        for e in range(epochs):
            assert samplers[rank].batches_in_epoch(e) == len(epochs_batches[e])

    # all ranks step in lockstep: the same number of batches every epoch
    assert len({tuple(len(ep) for ep in r) for r in per_rank}) == 1

    halves = [overlap_rank_halves(r, half) for r in per_rank]
    for e in range(epochs):
        order = interleave([h[e] for h in halves], half)
        check_global_order(order, n, replicas * half, cfg["drop_last"])
        if not cfg["shuffle"]:
            assert order == padded(list(range(n)), len(order)), "shuffle=False must follow the dataset order"
        # the batches are exactly those the definition builds from this global order
        for rank in range(replicas):
            assert halves[rank][e] == ref_halves(order, half, replicas, rank)
    for rank in range(replicas):
        expected = ref_overlap_epochs([ref_halves(interleave([h[e] for h in halves], half), half, replicas, rank)
                                       for e in range(epochs)])
        assert per_rank[rank] == expected


@SETTINGS
@given(overlap_config())
def test_overlap_global_permutation_does_not_depend_on_world_size(cfg):
    """One global seeded permutation: the order seen by `replicas` ranks is that seen by a single rank."""
    n, bs, replicas = cfg["n"], cfg["batch_size"], cfg["replicas"]
    half = bs // 2
    kw = dict(shuffle=cfg["shuffle"], seed=cfg["seed"], drop_last=False)
    single = overlap_rank_halves(iterate_epochs(OverlapBatchSampler(n, bs, **kw), 2), half)
    multi = [overlap_rank_halves(iterate_epochs(s, 2), half) for s in overlap_samplers(n, bs, replicas, **kw)]
    for e in range(2):
        a = sum(single[e], [])
        b = interleave([m[e] for m in multi], half)
        assert a[:n] == b[:n]


def test_shuffle_depends_on_seed_and_epoch_and_not_on_instance():
    def orders(seed, epochs=4, n=64):
        return [sum(h, []) for h in overlap_rank_halves(
            iterate_epochs(OverlapBatchSampler(n, 8, shuffle=True, seed=seed), epochs), 4)]

    a, b, c = orders(0), orders(0), orders(1)
    assert a == b, "the permutation must be reproducible from (seed, epoch)"
    assert a != c, "a different seed must give a different permutation"
    assert len({tuple(o) for o in a}) == 4, "every epoch must draw a fresh permutation"
    assert all(o != list(range(64)) for o in a), "shuffle=True did not shuffle"
    assert all(sorted(o) == list(range(64)) for o in a)
    # sequential order is the same every epoch
    seq = [sum(h, []) for h in overlap_rank_halves(
        iterate_epochs(OverlapBatchSampler(64, 8, shuffle=False), 3), 4)]
    assert seq == [list(range(64))] * 3


def test_set_epoch_order_independent():
    """Epoch e's batches depend only on e (not on which epochs were iterated before)."""
    ref = iterate_epochs(OverlapBatchSampler(50, 6, shuffle=True, seed=3, num_replicas=2, rank=1), 4)
    s = OverlapBatchSampler(50, 6, shuffle=True, seed=3, num_replicas=2, rank=1)
    s.set_epoch(3)
    assert [list(b) for b in s] == ref[3]
    s.set_epoch(1)
    assert [list(b) for b in s] == ref[1]
    # iterating the same epoch twice gives the same batches
    assert [list(b) for b in s] == ref[1]


@SETTINGS
@given(st.data())
def test_overlap_resume_from_state(data):
    cfg = data.draw(overlap_config())
    n, bs, replicas, epochs = cfg["n"], cfg["batch_size"], cfg["replicas"], cfg["epochs"] + 1
    rank = data.draw(st.integers(0, replicas - 1))
    kw = dict(shuffle=cfg["shuffle"], seed=cfg["seed"], drop_last=cfg["drop_last"], num_replicas=replicas, rank=rank)
    reference = iterate_epochs(OverlapBatchSampler(n, bs, **kw), epochs)
    e = data.draw(st.integers(0, epochs - 2))
    k = data.draw(st.integers(0, len(reference[e])))
    use_consumed = data.draw(st.booleans())

    a = OverlapBatchSampler(n, bs, **kw)
    for ep in range(e):
        a.set_epoch(ep)
        list(a)
    a.set_epoch(e)
    it = iter(a)
    taken = [list(next(it)) for _ in range(k)]
    assert taken == reference[e][:k]
    state = a.state_dict(batches_consumed=k) if use_consumed else a.state_dict()
    assert state["epoch"] == e and state["position"] == k

    b = OverlapBatchSampler(n, bs, **kw)
    b.load_state_dict(state)
    b.set_epoch(e)  # the training loop calls set_epoch for the resumed epoch: it must not rewind
    assert [list(x) for x in b] == reference[e][k:]
    for ep in range(e + 1, epochs):
        b.set_epoch(ep)
        assert [list(x) for x in b] == reference[ep]


def test_resume_without_set_epoch_and_state_is_plain_data():
    import copy
    import pickle

    ref = iterate_epochs(OverlapBatchSampler(40, 4, shuffle=True, seed=7), 3)
    a = OverlapBatchSampler(40, 4, shuffle=True, seed=7)
    a.set_epoch(1)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = pickle.loads(pickle.dumps(copy.deepcopy(a.state_dict())))
    b = OverlapBatchSampler(40, 4, shuffle=True, seed=7)
    b.load_state_dict(state)
    assert [list(x) for x in b] == ref[1][5:]
    b.set_epoch(2)
    assert [list(x) for x in b] == ref[2]


@pytest.mark.parametrize("field,other", [("batch_size", 6), ("num_samples", 41), ("seed", 1), ("num_replicas", 2)])
def test_overlap_state_from_different_setup_is_refused(field, other):
    base = dict(num_samples=40, batch_size=4, seed=0, num_replicas=1)
    a = OverlapBatchSampler(base["num_samples"], base["batch_size"], shuffle=True, seed=base["seed"],
                            num_replicas=base["num_replicas"])
    changed = dict(base, **{field: other})
    b = OverlapBatchSampler(changed["num_samples"], changed["batch_size"], shuffle=True, seed=changed["seed"],
                            num_replicas=changed["num_replicas"])
    with pytest.raises(ValueError, match=field):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("batch_size", [1, 3, 5, 7])
def test_overlap_odd_batch_size_is_refused(batch_size):
    with pytest.raises(ValueError, match="even"):
        OverlapBatchSampler(100, batch_size, shuffle=True)


@pytest.mark.parametrize("n,bs,replicas", [(3, 4, 1), (0, 2, 1), (7, 4, 2), (11, 4, 3), (1, 2, 1)])
def test_overlap_dataset_too_small_is_refused(n, bs, replicas):
    with pytest.raises(ValueError, match="too small"):
        OverlapBatchSampler(n, bs, shuffle=True, num_replicas=replicas)


def test_overlap_invalid_rank_or_batch_size():
    with pytest.raises(ValueError):
        OverlapBatchSampler(100, 0, shuffle=True)
    with pytest.raises(ValueError):
        OverlapBatchSampler(100, 4, shuffle=True, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        OverlapBatchSampler(100, 4, shuffle=True, num_replicas=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_overlap_as_dataloader_batch_sampler(shuffle):
    n = 30
    ds = TensorDataset(torch.arange(n), torch.arange(n) * 10)
    sampler = OverlapBatchSampler(n, 6, shuffle=shuffle, seed=2)
    loader = DataLoader(ds, batch_sampler=sampler)
    ref = iterate_epochs(OverlapBatchSampler(n, 6, shuffle=shuffle, seed=2), 2)
    for e in range(2):
        sampler.set_epoch(e)
        assert len(loader) == len(ref[e])
        got = [(idx.tolist(), val.tolist()) for idx, val in loader]
        assert [g[0] for g in got] == ref[e]
        assert all(v == [10 * i for i in idx] for idx, v in got)


def test_overlap_small_hand_example():
    # N=6, B=4, sequential: halves [0,1] [2,3] [4,5] | [0,1] [2,3] [4,5]
    s = OverlapBatchSampler(6, 4, shuffle=False)
    assert iterate_epochs(s, 2) == [[[0, 1, 2, 3], [2, 3, 4, 5]], [[4, 5, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5]]]
    # N=7 pads by wrap-around: halves [0,1] [2,3] [4,5] [6,0]
    s = OverlapBatchSampler(7, 4, shuffle=False)
    assert iterate_epochs(s, 1) == [[[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 0]]]
    s = OverlapBatchSampler(7, 4, shuffle=False, drop_last=True)
    assert iterate_epochs(s, 2) == [[[0, 1, 2, 3], [2, 3, 4, 5]], [[4, 5, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5]]]
    # two ranks, N=10, B=4: groups of 4 -> rank 0 [0,1] [4,5] [8,9]; rank 1 [2,3] [6,7] [0,1] (padded)
    r0 = OverlapBatchSampler(10, 4, shuffle=False, num_replicas=2, rank=0)
    r1 = OverlapBatchSampler(10, 4, shuffle=False, num_replicas=2, rank=1)
    assert iterate_epochs(r0, 1) == [[[0, 1, 4, 5], [4, 5, 8, 9]]]
    assert iterate_epochs(r1, 1) == [[[2, 3, 6, 7], [6, 7, 0, 1]]]


# --- ShuffledBatchSampler ------------------------------------------------------------------------------------

@st.composite
def plain_config(draw):
    replicas = draw(st.integers(1, 4))
    batch_size = draw(st.integers(1, 9))
    drop_last = draw(st.booleans())
    low = batch_size * replicas if drop_last else replicas
    n = draw(st.integers(low, low + 50))
    return dict(n=n, batch_size=batch_size, replicas=replicas, shuffle=draw(st.booleans()), drop_last=drop_last,
                seed=draw(st.integers(0, 3)), epochs=draw(st.integers(1, 3)))


@SETTINGS
@given(plain_config())
def test_shuffled_batches_partition_rank_shares(cfg):
    n, bs, replicas, drop_last = cfg["n"], cfg["batch_size"], cfg["replicas"], cfg["drop_last"]
    samplers = [ShuffledBatchSampler(n, bs, shuffle=cfg["shuffle"], seed=cfg["seed"], num_replicas=replicas,
                                     rank=r, drop_last=drop_last) for r in range(replicas)]
    per_rank = [iterate_epochs(s, cfg["epochs"]) for s in samplers]
    share = n // replicas if drop_last else ceil_div(n, replicas)
    n_batches = share // bs if drop_last else ceil_div(share, bs)
    for rank, s in enumerate(samplers):
        assert s.total_batches(cfg["epochs"]) == n_batches * cfg["epochs"]
        for batches in per_rank[rank]:
            assert len(batches) == n_batches
            sizes = [len(b) for b in batches]
            if drop_last:
                assert all(z == bs for z in sizes)
            else:
                assert all(z == bs for z in sizes[:-1]) and 1 <= sizes[-1] <= bs
                assert sum(sizes) == share
    orders = []
    for e in range(cfg["epochs"]):
        flat = [sum(per_rank[r][e], []) for r in range(replicas)]
        assert len({len(f) for f in flat}) == 1
        order = [flat[r][k] for k in range(len(flat[0])) for r in range(replicas)]
        if drop_last:
            assert len(set(order)) == len(order), "a sample is drawn twice with drop_last=True"
            assert len(order) == replicas * n_batches * bs
            assert n - len(order) < replicas * (bs + 1)
            assert all(0 <= i < n for i in order)
        else:
            check_global_order(order, n, replicas, drop_last=False)
            for f in flat:  # within a rank no sample repeats (the padding goes to other ranks)
                assert len(set(f)) == len(f)
        if not cfg["shuffle"]:
            assert order == padded(list(range(n)), len(order))
        orders.append(order)
    if cfg["shuffle"] and n >= 12 and cfg["epochs"] > 1:
        assert orders[0] != orders[1]


@SETTINGS
@given(st.data())
def test_shuffled_resume_from_state(data):
    cfg = data.draw(plain_config())
    epochs = cfg["epochs"] + 1
    rank = data.draw(st.integers(0, cfg["replicas"] - 1))
    kw = dict(shuffle=cfg["shuffle"], seed=cfg["seed"], drop_last=cfg["drop_last"],
              num_replicas=cfg["replicas"], rank=rank)
    n, bs = cfg["n"], cfg["batch_size"]
    reference = iterate_epochs(ShuffledBatchSampler(n, bs, **kw), epochs)
    e = data.draw(st.integers(0, epochs - 2))
    k = data.draw(st.integers(0, len(reference[e])))
    a = ShuffledBatchSampler(n, bs, **kw)
    a.set_epoch(e)
    it = iter(a)
    assert [list(next(it)) for _ in range(k)] == reference[e][:k]
    b = ShuffledBatchSampler(n, bs, **kw)
    b.load_state_dict(a.state_dict())
    b.set_epoch(e)
    assert [list(x) for x in b] == reference[e][k:]
    for ep in range(e + 1, epochs):
        b.set_epoch(ep)
        assert [list(x) for x in b] == reference[ep]


def test_shuffled_state_from_different_batch_size_is_refused():
    a = ShuffledBatchSampler(40, 4)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatchSampler(40, 8).load_state_dict(a.state_dict())


def test_shuffled_validation_and_dataloader():
    with pytest.raises(ValueError):
        ShuffledBatchSampler(10, 0)
    with pytest.raises(ValueError, match="too small"):
        ShuffledBatchSampler(1, 4, num_replicas=2)
    with pytest.raises(ValueError, match="too small"):
        ShuffledBatchSampler(7, 4, num_replicas=2, drop_last=True)
    ds = TensorDataset(torch.arange(23))
    sampler = ShuffledBatchSampler(23, 5, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler)
    assert len(loader) == math.ceil(23 / 5)
    got = sorted(i for (batch,) in loader for i in batch.tolist())
    assert got == list(range(23))


# --- samples seen: a function of the stream's position -------------------------------------------------------

def _counted_samples(sampler, epochs: int) -> dict[tuple[int, int], int]:
    """(epoch, position) -> samples in the batches the sampler yielded before that position, counted one by one."""
    seen, out = 0, {}
    for e, batches in enumerate(iterate_epochs(sampler, epochs)):
        out[(e, 0)] = seen
        for k, batch in enumerate(batches, start=1):
            seen += len(batch)
            out[(e, k)] = seen
    out[(epochs, 0)] = seen
    return out


@SETTINGS
@given(st.one_of(overlap_config(), plain_config()), st.data())
def test_samples_before_counts_the_batches_yielded(cfg, data):
    overlap = cfg["batch_size"] % 2 == 0 and cfg["n"] >= cfg["batch_size"] * cfg["replicas"] and data.draw(
        st.booleans())
    cls = OverlapBatchSampler if overlap else ShuffledBatchSampler
    rank = data.draw(st.integers(0, cfg["replicas"] - 1))
    sampler = cls(cfg["n"], cfg["batch_size"], shuffle=cfg["shuffle"], seed=cfg["seed"],
                  num_replicas=cfg["replicas"], rank=rank, drop_last=cfg["drop_last"])
    counted = _counted_samples(sampler, cfg["epochs"])
    for (epoch, position), expected in counted.items():
        assert sampler.samples_before(epoch, position) == expected, (epoch, position)


def test_samples_before_by_hand():
    # plain, N=10, B=4: batches of 4, 4, 2 per epoch
    plain = ShuffledBatchSampler(10, 4, shuffle=False)
    assert [plain.samples_before(0, k) for k in range(4)] == [0, 4, 8, 10]
    assert plain.samples_before(2, 1) == 24
    # overlap, N=8, B=4: 4 halves per epoch; epoch 0 has 3 batches, later epochs 4; each batch 4 samples
    overlap = OverlapBatchSampler(8, 4, shuffle=False)
    assert [overlap.samples_before(0, k) for k in range(4)] == [0, 4, 8, 12]
    assert overlap.samples_before(1, 0) == 12 and overlap.samples_before(2, 0) == 28
    # two ranks: each rank's own share (the recipe multiplies by the world size)
    assert ShuffledBatchSampler(10, 4, shuffle=False, num_replicas=2).samples_before(1, 0) == 5
