"""tf.distribute training: batch slicing, replica-independent dropout, and real strategies on CPU.

The strategy checks run the real train stage in subprocesses (a strategy must be set up before
TensorFlow starts): MirroredStrategy over two logical CPUs, and MultiWorkerMirroredStrategy
with two worker processes talking gRPC on 127.0.0.1, each compared with one plain process.
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner
from conftest import ROOT, TINY_PARAMS, merged, prepare_training_data

from captioning.batching import batch_order
from captioning.decoders.base import RowSeed, dense_gradients, dropout, dropout_seeds
from captioning.distribute import is_chief, loopback_cluster, make_strategy, replica_slices, worker_name
from captioning.train import CaptionSet
from stages import train as train_stage

TRAIN_ARGS = "--features data/features.h5 --vocab data/vocab.json --captions data/captions.h5 --no-progress"


def test_row_seed_dropout_is_the_whole_batch_mask_cut_into_slices():
    x = tf.random.stateless_normal((7, 5, 3), seed=[1, 2])
    seed = tf.constant([3, 9])
    whole = dropout(x, 0.3, seed).numpy()
    assert np.array_equal(dropout(x, 0.3, RowSeed(seed, tf.constant(0), tf.constant(7))).numpy(), whole)
    for parts in (2, 3, 4):  # drawn for the padded rows (m * parts), as training does
        m, slices = replica_slices(7, parts)
        cut = [dropout(x[a:b], 0.3, RowSeed(seed, tf.constant(a), tf.constant(m * parts))).numpy() for a, b in slices]
        assert np.array_equal(np.concatenate(cut), whole), parts
    # Compiled by XLA (train.jit): other random numbers, but again a row's mask does not depend
    # on how many rows are drawn after it, so padding the batch for replicas changes nothing.
    xla = tf.function(lambda x, offset, total: dropout(x, 0.3, RowSeed(seed, offset, total)), jit_compile=True)
    whole = xla(x, tf.constant(0), tf.constant(7)).numpy()
    for parts in (2, 3, 4):
        m, slices = replica_slices(7, parts)
        cut = [xla(x[a : a + m], tf.constant(a), tf.constant(m * parts)).numpy()[: b - a] for a, b in slices]
        assert np.array_equal(np.concatenate(cut), whole), parts
    # split seeds keep the slice, and the same streams as a plain seed
    a, b = dropout_seeds(RowSeed(seed, tf.constant(2), tf.constant(7)))
    assert int(b.offset) == 2 and np.array_equal(b.seed.numpy(), dropout_seeds(seed)[1].numpy())
    # padding rows (past the batch) reuse the last row's mask instead of failing
    pad = dropout(tf.ones((3, 2)), 0.5, RowSeed(seed, tf.constant(6), tf.constant(7))).numpy()
    assert np.array_equal(pad[1], pad[0]) and np.array_equal(pad[2], pad[0])


def test_replica_slices_cover_the_batch_once():
    assert replica_slices(7, 2) == (4, [(0, 4), (4, 7)])
    assert replica_slices(2, 4) == (1, [(0, 1), (1, 2), (2, 2), (2, 2)])  # empty replicas: all padding
    assert replica_slices(8, 1) == (8, [(0, 8)])


def test_replica_batches_read_only_local_rows_without_overlap():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 4, 3)).astype(np.float32)
    tokens = np.zeros((11, 6), np.int32)
    for i in range(11):
        tokens[i, : 3 + i % 3] = [1, *rng.integers(4, 9, size=1 + i % 3), 2]
    data = CaptionSet(feats, tokens, rng.integers(0, 6, size=11))
    # the expected batches, built here from the epoch order itself (not through CaptionSet)
    lengths = (tokens > 0).sum(axis=1)
    order = batch_order(lengths, data.image_rows, 5, np.random.default_rng(1))
    plain = [(feats[data.image_rows[idx]], tokens[idx][:, : lengths[idx].max()]) for idx in order]
    assert [t.tolist() for _, t in data.batches(5, np.random.default_rng(1), prefetch_depth=0)] == [
        t.tolist() for _, t in plain
    ]
    for replicas in (1, 2, 3):
        seen = [[] for _ in plain]
        for local in ([r] for r in range(replicas)):  # one process per replica, as with workers
            batches = data.replica_batches(
                5, np.random.default_rng(1), replicas=replicas, local=local, prefetch_depth=0
            )
            for i, ((n, count, parts), (f, t)) in enumerate(zip(batches, plain)):
                assert n == len(t) and count == (t[:, 1:] > 0).sum()
                [(pf, pt, offset)] = parts
                m, slices = replica_slices(n, replicas)
                a, b = slices[local[0]]
                assert pf.shape == (m, 4, 3) and pt.shape == (m, t.shape[1]) and offset == a
                np.testing.assert_array_equal(pf[: b - a], f[a:b])
                np.testing.assert_array_equal(pt[: b - a], t[a:b])
                assert not pt[b - a :].any() and not pf[b - a :].any()  # padding: empty captions
                seen[i] += list(range(a, b))
        assert all(sorted(s) == list(range(len(t))) for s, (_, t) in zip(seen, plain))  # once each


def test_dense_gradients_sum_repeated_words():
    """A sparse embedding gradient holds a row per occurrence; dense adds them up (what Adam needs)."""
    table = tf.Variable(tf.ones((4, 2)))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [1, 1, 3]) * [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    [sparse] = tape.gradient(loss, [table])
    assert isinstance(sparse, tf.IndexedSlices)
    [dense] = dense_gradients([sparse], [table])
    np.testing.assert_array_equal(dense.numpy(), [[0, 0], [4, 6], [0, 0], [5, 6]])
    [zero] = dense_gradients([None], [table])
    assert not zero.numpy().any()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny features, vocabulary and captions (what train reads), made once for this module."""
    root = tmp_path_factory.mktemp("dist")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare_training_data(str(params))
    finally:
        os.chdir(cwd)
    return root


def write_params(root, name, **train):
    path = root / name
    path.write_text(yaml.safe_dump(merged(TINY_PARAMS, {"train": train}), sort_keys=False))
    return path


def train_cmd(params, out, checkpoint):
    return [
        sys.executable,
        str(ROOT / "stages/train.py"),
        "--params",
        str(params),
        *TRAIN_ARGS.split(),
        "--checkpoint",
        checkpoint,
        "--model-dir",
        f"{out}_model",
        "--live-dir",
        f"{out}_live",
    ]


def run(cmd, root, env=None, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def history(root, checkpoint):
    state = json.loads((root / checkpoint / "state.json").read_text())
    return np.array([[h["train_loss"], h["val_loss"]] for h in state["history"]])


def best_weights(root, checkpoint):
    with h5py.File(root / checkpoint / "best.weights.h5") as f:
        return [f[k][()] for k in sorted(f)]


def assert_same_run(root, a, b):
    """The same loss curve to the 6 decimals stored; weights within half an Adam step (Adam moves a
    weight whose gradient is ~0 by up to the learning rate on float noise alone)."""
    ha, hb = history(root, a), history(root, b)
    assert ha.shape == hb.shape
    np.testing.assert_allclose(ha, hb, rtol=0, atol=2e-6)
    for wa, wb in zip(best_weights(root, a), best_weights(root, b)):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=TINY_PARAMS["train"]["learning_rate"] / 2)


def test_auto_is_the_plain_strategy_on_a_machine_without_gpus_or_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    strategy = make_strategy("auto")
    assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    assert is_chief(strategy) and worker_name(strategy) == "single process"


def test_unknown_strategy_and_missing_tf_config_are_clear_errors(data_dir, monkeypatch):
    monkeypatch.chdir(data_dir)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    params = write_params(data_dir, "params_bogus.yaml", strategy="bogus")
    res = CliRunner().invoke(train_stage.main, train_cmd(params, "x", "ck_x")[2:])
    assert res.exit_code == 1 and "train.strategy" in res.output and "multi_worker" in res.output, res.output
    params = write_params(data_dir, "params_mw_missing.yaml", strategy="multi_worker")
    res = CliRunner().invoke(train_stage.main, train_cmd(params, "x", "ck_x")[2:])
    assert res.exit_code == 1 and "needs the TF_CONFIG environment variable" in res.output, res.output
    monkeypatch.setenv("TF_CONFIG", "{not json")
    res = CliRunner().invoke(train_stage.main, train_cmd(params, "x", "ck_x")[2:])
    assert res.exit_code == 1 and "TF_CONFIG is not valid JSON" in res.output, res.output
    assert not (data_dir / "ck_x").exists() and not (data_dir / "x_model").exists()


@pytest.fixture(scope="module")
def one_process(data_dir):
    """The reference: 8 epochs in one plain process (batch 16 over 48 captions: 3 steps each)."""
    params = write_params(data_dir, "params_one.yaml", epochs=8, patience=8)
    res = run(train_cmd(params, "one", "ck_one"), data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return "ck_one"


def test_mirrored_over_two_cpus_matches_one_process(data_dir, one_process):
    params = write_params(data_dir, "params_mirrored.yaml", epochs=8, patience=8, strategy="mirrored")
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from stages.train import main\n"
        "main(sys.argv[1:])\n"
    )
    res = run([sys.executable, "-c", script, *train_cmd(params, "mirrored", "ck_mirrored")[2:]], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 replica(s)" in res.stdout
    assert_same_run(data_dir, "ck_mirrored", one_process)


def start_workers(root, params, out, checkpoints):
    """One train process per checkpoint folder, as workers 0..N-1 of a loopback cluster."""
    cluster = loopback_cluster(len(checkpoints))
    procs = []
    for i, ck in enumerate(checkpoints):
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        }
        cmd = train_cmd(params, f"{out}{i}", ck)
        procs.append(
            subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def checkpointed_epoch(state) -> int:
    """The epoch a running worker's checkpoint holds, 0 before the first. The checkpoint folder is
    replaced atomically by two renames (old aside, new in place), so between them it is absent."""
    try:
        return json.loads(state.read_text())["epoch"]
    except FileNotFoundError:
        return 0


def finish(procs, timeout=300):
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def test_two_workers_on_loopback_match_one_process_fail_clearly_and_resume(data_dir, one_process):
    params = write_params(data_dir, "params_mw.yaml", epochs=8, patience=8, strategy="multi_worker")
    # 1. Kill worker 1 once the chief has checkpointed epoch 2: the chief stops with a clear error.
    procs = start_workers(data_dir, params, "mw", ["ck_mw", "ck_mw"])
    state = data_dir / "ck_mw/state.json"
    deadline = time.monotonic() + 240
    while checkpointed_epoch(state) < 2:
        assert time.monotonic() < deadline and procs[0].poll() is None, finish(procs)[0][2][-3000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    (rc0, out0, err0), (rc1, *_) = finish(procs)
    assert rc1 == -signal.SIGKILL
    epoch = json.loads(state.read_text())["epoch"]
    assert 2 <= epoch < 8 and rc0 == 1, err0[-3000:]
    assert "lost another worker" in err0 and f"resumes from the checkpoint after epoch {epoch}" in err0, err0[-3000:]
    assert not (data_dir / "mw0_model").exists()  # no half-trained model left as the output
    # 2. A worker that cannot see the chief's checkpoint folder is refused, not trained from scratch.
    (rc0, _, err0), (rc1, _, err1) = finish(start_workers(data_dir, params, "mw", ["ck_mw", "ck_elsewhere"]))
    assert rc0 == 1 and rc1 == 1 and "workers disagree on where training starts" in err0 + err1, err0[-3000:]
    # 3. Both started again: the chief resumes, and the whole run equals one plain process.
    (rc0, out0, err0), (rc1, out1, _) = finish(start_workers(data_dir, params, "mw", ["ck_mw", "ck_mw"]))
    assert rc0 == 0 and rc1 == 0, err0[-3000:]
    assert f"resuming from ck_mw after epoch {epoch}" in out0
    assert "2 replica(s)" in out0 and "the chief writes" in out1
    assert (data_dir / "mw0_model/config.json").is_file() and not (data_dir / "mw1_model").exists()
    assert not (data_dir / "mw1_live").exists() and not (data_dir / "ck_elsewhere/state.json").exists()
    assert_same_run(data_dir, "ck_mw", one_process)
