"""The training shard reader: disjoint ranks, deterministic shuffle, exact resume, posterior draws, bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest

from dig.data.reader import LatentShardReader, ShardReadError, load_manifest
from dig.data.shard_format import SAMPLE_KEY_FORMAT
from dig.data.synthetic import synthetic_sample, write_synthetic_dataset

C, S, K = 4, 8, 10  # channels, latent side, classes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("latents"))
    write_synthetic_dataset(root, num_shards=6, samples_per_shard=5, latent_size=S, channels=C, num_classes=K)
    return root


def reader(path, rank=0, world=1, mb=4, **kw):
    kw.setdefault("window_shards", 2)
    return LatentShardReader(path, rank=rank, world_size=world, micro_batch_size=mb, seed=kw.pop("seed", 3), **kw)


def epoch_keys(r: LatentShardReader, steps: int) -> list[str]:
    return [k for _ in range(steps) for k in r.next_batch().keys]


def test_ranks_read_disjoint_samples_covering_the_epoch(dataset):
    # 6 shards x 5 = 30 samples, 2 ranks x 3 shards = 15 each, micro-batch 5 -> every sample exactly once.
    ranks = [reader(dataset, rank=r, world=2, mb=5) for r in range(2)]
    assert [x.steps_per_epoch(0) for x in ranks] == [3, 3]
    seen = [epoch_keys(x, 3) for x in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [SAMPLE_KEY_FORMAT.format(i) for i in range(30)]


def test_quota_drops_the_remainder_equally(tmp_path):
    # Uneven shards: ranks get 3+4 and 5+6 or similar; every rank yields min(total) rounded to micro-batches.
    root = str(tmp_path)
    write_synthetic_dataset(root, num_shards=4, samples_per_shard=[3, 4, 5, 6], latent_size=S, channels=C)
    ranks = [reader(root, rank=r, world=2, mb=2) for r in range(2)]
    totals = [sum([3, 4, 5, 6][i] for i in x.rank_shards(0)) for x in ranks]
    assert ranks[0].quota(0) == min(totals) // 2 * 2
    keys = [epoch_keys(x, ranks[0].steps_per_epoch(0)) for x in ranks]
    assert len(set(keys[0])) == len(keys[0]) and not set(keys[0]) & set(keys[1])
    # the next epoch starts afresh with a different deal
    assert ranks[0].next_batch() is not None and ranks[0].epoch == 1


def test_shuffle_depends_only_on_seed_and_epoch(dataset):
    a, b, c = reader(dataset, seed=1), reader(dataset, seed=1), reader(dataset, seed=2)
    ka, kb, kc = (epoch_keys(x, 7) for x in (a, b, c))
    assert ka == kb and ka != kc
    e1 = epoch_keys(a, 7)  # epoch 1: a different order of the same 28 of 30 samples' superset
    assert e1 != ka and len(set(e1)) == 28 and a.epoch == 1


def test_posterior_draw_and_flip(dataset):
    # Independent reference: the synthetic generator gives each sample's (mean, std); the flipped mean is the
    # mirror image. The reader's latent / scaling_factor must be mean[f] + std[f] * eps with eps ~ N(0, 1).
    r = reader(dataset, mb=6)
    scale = load_manifest(dataset)[1].scaling_factor
    eps, flips = [], []
    for _ in range(5):
        batch = r.next_batch()
        for x, key, label in zip(batch.latents.numpy().astype(np.float64), batch.keys, batch.labels.tolist()):
            want_label, mean, std = synthetic_sample(int(key), C, S, K)
            assert label == want_label
            dist = [np.abs(x / scale - mean[f]).max() for f in (0, 1)]
            f = int(np.argmin(dist))
            flips.append(f)
            eps.append((x / scale - mean[f]) / std[f])
    eps = np.concatenate([e.ravel() for e in eps])
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05  # 7680 draws: 5-sigma bounds ~0.06
    assert 5 <= sum(flips) <= 25  # both flips occur (30 samples, p=1/2 each)


def test_stats_normalisation(dataset):
    r = reader(dataset, mb=30, latent_norm="stats", random_flip=False)
    x = r.next_batch().latents.numpy().astype(np.float64)
    # per-channel stats were computed from the unflipped means; the draws add noise std <= 0.5 on data std ~4
    assert np.all(np.abs(x.mean(axis=(0, 2, 3))) < 0.1) and np.all(np.abs(x.std(axis=(0, 2, 3)) - 1) < 0.1)


@pytest.mark.parametrize("prefetch_batches", [0, 3])  # batches built in this thread, or ahead in another
@pytest.mark.parametrize("stop_after", [1, 3, 7, 9])  # inside a window, at a window edge, across epochs
def test_resume_continues_exactly(dataset, stop_after, prefetch_batches):
    straight = reader(dataset, mb=4, prefetch_batches=0)
    want = [straight.next_batch() for _ in range(stop_after + 5)]
    first = reader(dataset, mb=4, prefetch_batches=prefetch_batches)
    for _ in range(stop_after):
        first.next_batch()
    state = first.state_dict()
    first.close()
    resumed = reader(dataset, mb=4, prefetch_batches=prefetch_batches)
    resumed.load_state_dict(state)
    for w in want[stop_after:]:
        got = resumed.next_batch()
        assert got.keys == w.keys
        assert np.array_equal(got.latents.numpy(), w.latents.numpy())
        assert np.array_equal(got.labels.numpy(), w.labels.numpy())


def test_resume_refuses_a_different_world(dataset):
    state = reader(dataset, rank=0, world=2, mb=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        reader(dataset, rank=0, world=3, mb=2).load_state_dict(state)


def test_brace_pattern_selects_shards(dataset):
    r = reader(os.path.join(dataset, "train-{000001..000002}.tar"), mb=5)
    keys = epoch_keys(r, 2)
    assert sorted(keys) == [SAMPLE_KEY_FORMAT.format(i) for i in range(5, 15)]


def test_shape_mismatch_is_an_error_at_start(dataset):
    with pytest.raises(ValueError, match="latents are 8x8, the run expects 32x32"):
        reader(dataset, expected_latent_size=32)


@pytest.mark.parametrize("prefetch", [False, True])  # windows loaded inline, or by the loading process
def test_unreadable_shard_is_retried_then_skipped_or_fatal(tmp_path, prefetch):
    root = str(tmp_path)
    write_synthetic_dataset(root, num_shards=3, samples_per_shard=4, latent_size=S, channels=C)
    os.truncate(os.path.join(root, "train-000001.tar"), 700)  # cut inside the first member
    r = reader(root, mb=4, read_retries=1, window_shards=1, prefetch=prefetch)
    keys = epoch_keys(r, 3)
    position = r.state_dict()  # counters as of the batches handed out (a prefetching thread may be ahead)
    assert position["shards_skipped"] == 1
    good = {SAMPLE_KEY_FORMAT.format(i) for i in (0, 1, 2, 3, 8, 9, 10, 11)}
    assert set(keys) == good and position["samples_repeated"] == 4  # the short rank repeats to stay in step
    r.close()
    strict = reader(root, mb=4, read_retries=0, window_shards=1, prefetch=prefetch, on_bad_shard="fail")
    with pytest.raises(ShardReadError, match="train-000001.tar unreadable"):
        epoch_keys(strict, 3)
    strict.close()


def test_s3_reader_matches_local(tmp_path, s3_bucket):
    local = str(tmp_path)
    write_synthetic_dataset(local, num_shards=3, samples_per_shard=4, latent_size=S, channels=C)
    remote = f"s3://{s3_bucket}/latents"
    write_synthetic_dataset(remote, num_shards=3, samples_per_shard=4, latent_size=S, channels=C)
    a, b = reader(local, mb=4), reader(remote, mb=4)
    for _ in range(4):
        x, y = a.next_batch(), b.next_batch()
        assert x.keys == y.keys and np.array_equal(x.latents.numpy(), y.latents.numpy())
    a.close(), b.close()


def test_windows_loaded_by_the_loading_process_equal_inline_loads(dataset):
    inline, ahead = reader(dataset, mb=4, prefetch=False, prefetch_batches=0), reader(dataset, mb=4)
    for _ in range(9):  # two epochs
        a, b = inline.next_batch(), ahead.next_batch()
        assert a.keys == b.keys and np.array_equal(a.latents.numpy(), b.latents.numpy())
        assert np.array_equal(a.labels.numpy(), b.labels.numpy())
    ahead.close()


LOADER_OWNER = """
import sys
from dig.data.reader import LatentShardReader

if __name__ == "__main__":  # the loading process starts from a fresh interpreter, which imports this module
    r = LatentShardReader(sys.argv[1], rank=0, world_size=1, micro_batch_size=4, window_shards=2)
    r.next_batch()
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_loading_process_ends_when_the_reader_process_is_killed(dataset, tmp_path):
    """SIGKILL (an OOM kill, a scheduler) leaves no shard-loading process behind."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "owner.py"
    script.write_text(LOADER_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), dataset], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__)))})
    try:
        assert owner.stdout.readline().strip() == "ready"
        children = psutil.Process(owner.pid).children(recursive=True)
        assert children, "the reader started no loading process"
    finally:
        owner.kill()
        owner.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


@pytest.mark.gpu
def test_pinned_batches_equal_pageable_ones(dataset):
    pinned, plain = reader(dataset, mb=4, pin_memory=True), reader(dataset, mb=4)
    for _ in range(3):
        a, b = pinned.next_batch(), plain.next_batch()
        assert a.latents.is_pinned() and a.labels.is_pinned() and not b.latents.is_pinned()
        assert a.keys == b.keys and np.array_equal(a.latents.numpy(), b.latents.numpy())
    pinned.close(), plain.close()



# --- resume on another world size: the rest of the epoch re-dealt ------------------------------------------------

@pytest.fixture(scope="module")
def dataset48(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("latents48"))
    write_synthetic_dataset(root, num_shards=6, samples_per_shard=8, latent_size=S, channels=C, num_classes=K)
    return root


def redealt(path, states, world, mb, **kw):
    """Readers of a new world size continuing from the states of the old one."""
    ranks = [reader(path, rank=r, world=world, mb=mb, prefetch=False, **kw) for r in range(world)]
    for r in ranks:
        r.load_state_dict(r.redealt_state(states))
    return ranks


def batches(ranks, steps):
    """keys -> (latent, label) of `steps` micro-batches on every rank, and the keys in order."""
    out, order = {}, []
    for _ in range(steps):
        for r in ranks:
            b = r.next_batch()
            for i, k in enumerate(b.keys):
                out[k] = (b.latents[i].numpy(), int(b.labels[i]))
                order.append(k)
    return out, order


@pytest.mark.parametrize("prefetch_batches", [0, 3])
def test_redeal_2_3_1_2_reads_every_sample_of_the_epoch_once(dataset48, prefetch_batches):
    # 48 samples; 2 ranks x mb 2 read 12, 3 ranks x mb 2 read 12 of the 36 left, 1 rank x mb 4 reads 12 of 24,
    # 2 ranks x mb 2 read the last 12. A straight 2-rank run is the reference for every sample's draw and for the
    # next epoch (planned for the new world size as if nothing had happened).
    straight = [reader(dataset48, rank=r, world=2, mb=2, prefetch=False, prefetch_batches=0) for r in range(2)]
    want, _ = batches(straight, 12)
    assert len(want) == 48
    want_next, want_next_order = batches(straight, 3)

    ranks = [reader(dataset48, rank=r, world=2, mb=2, prefetch=False, prefetch_batches=prefetch_batches)
             for r in range(2)]
    seen, order = batches(ranks, 3)
    for world, mb, steps, share in ((3, 2, 2, 12), (1, 4, 3, 24), (2, 2, 3, 6)):
        states = [r.state_dict() for r in ranks]
        assert len({(s["epoch"], s["consumed"]) for s in states}) == 1
        for r in ranks:
            r.close()
        ranks = redealt(dataset48, states, world, mb, prefetch_batches=prefetch_batches)
        assert [r.quota(0) for r in ranks] == [share] * world  # the rest of the epoch, shared equally
        got, got_order = batches(ranks, steps)
        assert not set(got) & set(seen), "a sample was repeated across the change"
        seen.update(got)
        order += got_order
    assert len(order) == len(set(order)) == 48
    assert sorted(seen) == sorted(want)
    for k, (latent, label) in want.items():
        assert np.array_equal(seen[k][0], latent) and seen[k][1] == label, k
    # the next epoch: the plan for 2 ranks, the same as the straight run's
    assert batches(ranks, 3)[1] == want_next_order and all(r.epoch == 1 for r in ranks)


def test_redeal_is_deterministic_and_keeps_the_old_order(dataset48):
    ranks = [reader(dataset48, rank=r, world=2, mb=2, prefetch=False) for r in range(2)]
    first = batches(ranks, 2)[1]
    states = [r.state_dict() for r in ranks]
    rest_2 = batches(ranks, 10)[1]   # what the 2 ranks would have read
    one = redealt(dataset48, states, 1, 4)
    again = redealt(dataset48, states, 1, 4)
    rest_1 = batches(one, 10)[1]
    assert rest_1 == batches(again, 10)[1]
    # one rank continues each old rank's sequence in turn: rank 0's rest (its 2 keys of every 4), then rank 1's
    old_rank_rest = [[k for i in range(10) for k in rest_2[i * 4 + q * 2:i * 4 + q * 2 + 2]] for q in (0, 1)]
    assert rest_1 == old_rank_rest[0] + old_rank_rest[1]
    assert not set(rest_1) & set(first) and len(set(first + rest_1)) == 48


def test_redeal_leaves_out_what_does_not_fill_a_micro_batch_per_rank(dataset48, caplog):
    ranks = [reader(dataset48, rank=r, world=2, mb=2, prefetch=False) for r in range(2)]
    seen = batches(ranks, 1)[1]                  # 4 read, 44 left: 3 ranks x 12 (3 x mb 4), 8 left out
    three = redealt(dataset48, [r.state_dict() for r in ranks], 3, 4)
    assert [r.quota(0) for r in three] == [12, 12, 12]
    assert "8 of the epoch's 44 remaining samples" in caplog.text
    rest = batches(three, 3)[1]
    assert len(set(seen + rest)) == 40
    assert all(r.next_batch() is not None and r.epoch == 1 for r in three)


def test_redeal_at_the_end_of_an_epoch_starts_the_next(dataset48):
    ranks = [reader(dataset48, rank=r, world=2, mb=4, prefetch=False) for r in range(2)]
    batches(ranks, 6)                            # 2 x 24: the whole epoch
    one = redealt(dataset48, [r.state_dict() for r in ranks], 1, 4)
    assert one[0].state_dict()["epoch"] == 1 and one[0].state_dict()["dealt"] is None
    assert batches(one, 12)[1] == batches([reader(dataset48, world=1, mb=4, prefetch=False)], 24)[1][48:]


def test_redeal_refuses_ranks_out_of_step_or_another_dataset(dataset48):
    ranks = [reader(dataset48, rank=r, world=2, mb=2, prefetch=False) for r in range(2)]
    ranks[0].next_batch()
    with pytest.raises(ValueError, match="different \\(epoch, samples consumed\\)"):
        reader(dataset48, mb=2, prefetch=False).redealt_state([r.state_dict() for r in ranks])
    ranks[1].next_batch()
    with pytest.raises(ValueError, match="shard list"):
        reader(os.path.join(dataset48, "train-{000000..000004}.tar"), mb=2,
               prefetch=False).redealt_state([r.state_dict() for r in ranks])


@pytest.mark.parametrize("prefetch_batches", [0, 3])
def test_a_redealt_position_resumes_exactly_at_the_same_world_size(dataset48, prefetch_batches):
    ranks = [reader(dataset48, rank=r, world=2, mb=2, prefetch=False) for r in range(2)]
    batches(ranks, 3)                            # 12 read, 36 left for one rank: 9 micro-batches of 4
    one = redealt(dataset48, [r.state_dict() for r in ranks], 1, 4, prefetch_batches=prefetch_batches)[0]
    batches([one], 2)
    state = one.state_dict()
    want = [one.next_batch() for _ in range(9)]  # the epoch's last 7, then 2 of epoch 1
    resumed = reader(dataset48, world=1, mb=4, prefetch_batches=prefetch_batches)
    resumed.load_state_dict(state)
    for w in want:
        got = resumed.next_batch()
        assert got.keys == w.keys and np.array_equal(got.latents.numpy(), w.latents.numpy())
    assert resumed.epoch == 1 and resumed.state_dict()["dealt"] is None
    resumed.close()
    one.close()
