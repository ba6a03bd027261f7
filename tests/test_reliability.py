"""Reliability: killed and preempted runs resume exactly; non-finite steps never reach the params."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from medim_jax import errors
from medim_jax.data import build as data_build
from medim_jax.training import checkpointing, loss_watch, train
from tests.test_train import assert_trees_equal, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_TRAIN = [sys.executable, "-m", "medim_jax.main", "--config", "configs/smoke.py:tiny",
             "--mode", "train", "--config.train.log_every=1", "--config.train.eval_every=1000"]


def overrides(**train_overrides):
  return [f"--config.train.{key}={value}" for key, value in train_overrides.items()]


def start_training(workdir, settings, log_path=None):
  """The training command line in a subprocess; its output goes to a pipe, or to log_path."""
  output = open(log_path, "a") if log_path else subprocess.PIPE
  return subprocess.Popen(CLI_TRAIN + ["--workdir", str(workdir)] + overrides(**settings), cwd=REPO,
                          stdout=output, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_until_step(process, step):
  """Read the run's output until it logs ``step`` (or ends); returns everything read."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    logged = re.match(r"step (\d+):", line)
    if logged and int(logged.group(1)) >= step:
      break
  return "".join(lines)


def finished_checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def wait_for_checkpoint_after(process, workdir, step, timeout_s=120.0):
  deadline = time.monotonic() + timeout_s
  while not [s for s in finished_checkpoints(workdir) if s > step]:
    assert process.poll() is None, "the training process ended before its next checkpoint"
    assert time.monotonic() < deadline, f"no checkpoint after step {step} within {timeout_s} s"
    time.sleep(0.01)


def restore(workdir, config, layout, step=None):
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 100)
  try:
    return checkpointer.restore(train.Trainer(config, layout).abstract_state(), step=step)
  finally:
    checkpointer.close()


def train_rows(workdir):
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  return [row for row in map(json.loads, lines) if row["split"] == "train"]


@pytest.fixture(scope="module")
def dataset():
  return data_build.build_dataset(tiny_config())


def test_killed_at_random_steps_and_resumed_equals_the_uninterrupted_run(dataset, tmp_path):
  settings = dict(num_steps=24, checkpoint_every=3, ema_decay=0.9)
  straight = train.train_and_evaluate(tiny_config(**settings, log_every=1, eval_every=1000),
                                      str(tmp_path / "straight"), dataset, progress=False)
  killed, rng, log = tmp_path / "killed", random.Random(0), str(tmp_path / "killed.log")
  for _ in range(3):
    # SIGKILL at a random moment after the run got past its last checkpoint: mid-step, mid-log,
    # or while the next checkpoint is being written.
    process = start_training(killed, settings, log)
    wait_for_checkpoint_after(process, killed, max(finished_checkpoints(killed), default=0))
    time.sleep(rng.uniform(0.0, 0.4))
    process.kill()
    process.wait()
  kills = open(log).read()
  assert "Traceback" not in kills and kills.count("Resumed from") == 2, kills
  process = start_training(killed, settings)
  output = process.communicate()[0]
  assert process.returncode == 0, output
  assert f"Resumed from {killed / 'checkpoints'}" in output, output
  assert_trees_equal(straight, restore(str(killed), tiny_config(**settings), dataset.layout))
  # The losses are the uninterrupted run's too, logged once per step after the replays.
  killed_rows, straight_rows = train_rows(killed), train_rows(tmp_path / "straight")
  assert [r["step"] for r in killed_rows] == list(range(1, 25))
  assert [r["loss"] for r in killed_rows] == [r["loss"] for r in straight_rows]
  assert os.listdir(killed / "tensorboard")


def test_sigterm_finishes_the_step_saves_it_and_exits_as_preempted(dataset, tmp_path):
  process = start_training(tmp_path, dict(num_steps=5000, checkpoint_every=1000))
  read_until_step(process, 4)
  process.send_signal(signal.SIGTERM)
  output = process.communicate()[0]
  assert process.returncode == 128 + signal.SIGTERM, output
  stopped = re.search(r"training stopped by SIGTERM after step (\d+); the checkpoint (\S+) is saved",
                      output)
  assert stopped, output
  step = int(stopped.group(1))
  assert os.listdir(tmp_path / "checkpoints") == [str(step)]  # nothing half-written left behind
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), 1)
  state = checkpointer.restore(train.Trainer(tiny_config(), dataset.layout).abstract_state())
  iterator_state = checkpointer.manager.restore(step).data_iter
  checkpointer.close()
  assert int(state.step) == step and iterator_state["step"] == step
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))


class PoisonedDataset:
  """The dataset, with the loss of the given training steps multiplied by NaN (see poison_loss)."""

  def __init__(self, dataset, bad_steps):
    self.dataset, self.bad_steps = dataset, set(bad_steps)

  def __getattr__(self, name):
    return getattr(self.dataset, name)

  def train_iterator(self, batch_size, seed):
    inner, bad_steps = self.dataset.train_iterator(batch_size, seed), self.bad_steps

    class Poisoned:
      def __next__(self):
        batch = next(inner)
        return dict(batch, poison=np.float32(np.nan if inner.step in bad_steps else 1.0))

      def __getattr__(self, name):
        return getattr(inner, name)

    return Poisoned()


@pytest.fixture
def poison_loss(monkeypatch):
  clean_loss = train.Trainer._loss

  def loss(self, params, batch, key, training=True):
    value, metrics = clean_loss(self, params, batch, key, training)
    poison = batch.get("poison", 1.0)
    return value * poison, dict(metrics, loss=metrics["loss"] * poison)

  monkeypatch.setattr(train.Trainer, "_loss", loss)


@pytest.fixture(scope="module")
def clean_run(dataset, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("clean"))
  train.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=1, max_checkpoints_to_keep=10),
                           workdir, dataset, progress=False)
  return workdir


def test_a_nonfinite_step_is_skipped_and_never_reaches_the_state(dataset, clean_run, tmp_path,
                                                                 poison_loss):
  config = tiny_config(num_steps=4, checkpoint_every=1, max_checkpoints_to_keep=10)
  final = train.train_and_evaluate(config, str(tmp_path), PoisonedDataset(dataset, {2}),
                                   progress=False)
  before, at = (restore(str(tmp_path), config, dataset.layout, step) for step in (1, 2))
  assert_trees_equal(restore(clean_run, config, dataset.layout, 1), before)
  assert_trees_equal((before.params, before.opt_state), (at.params, at.opt_state))
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(final.params))
  assert not np.array_equal(np.asarray(jax.tree.leaves(final.params)[0]),
                            np.asarray(jax.tree.leaves(at.params)[0]))  # training went on
  events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [e["step"] for e in events if e["split"] == "loss_event"] == [2]


def test_on_nonfinite_stop_ends_the_run_with_the_last_checkpoint_intact(dataset, clean_run,
                                                                        tmp_path, poison_loss):
  config = tiny_config(num_steps=4, checkpoint_every=1, max_checkpoints_to_keep=10,
                       on_nonfinite="stop")
  with pytest.raises(errors.NonFiniteError, match=r"at step 4 .*Last checkpoint: .*checkpoints/3"):
    train.train_and_evaluate(config, str(tmp_path), PoisonedDataset(dataset, {4}), progress=False)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]
  assert_trees_equal(restore(clean_run, config, dataset.layout, 3),
                     restore(str(tmp_path), config, dataset.layout, 3))


def test_loss_watch_gives_up_after_too_many_bad_steps_in_a_row_and_logs_spikes():
  watch = loss_watch.LossWatch("skip", max_consecutive_nonfinite=2, spike_sigma=4.0, min_history=5)
  for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.1, 1.9], start=1):
    assert watch.observe(step, loss, nonfinite=False) is None
  assert "loss spike 9" in watch.observe(7, 9.0, nonfinite=False)
  assert "update skipped (1 in a row" in watch.observe(8, float("nan"), nonfinite=True)
  watch.observe(9, float("nan"), nonfinite=True)
  with pytest.raises(errors.NonFiniteError, match="3 non-finite steps in a row"):
    watch.observe(10, float("inf"), nonfinite=True)
  with pytest.raises(errors.InputError, match="on_nonfinite must be one of"):
    loss_watch.LossWatch("ignore")


def save_small(checkpointer, step):
  checkpointer.save(step, {"w": np.full((3,), step, np.float32)})


def test_checkpoint_retention_keeps_the_newest_and_every_keep_period(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1, keep_period=2)
  for step in range(1, 6):
    save_small(checkpointer, step)
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 4, 5]
  checkpointer.close()


def test_a_checkpoint_half_written_by_a_crash_is_ignored_and_cleaned_up(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  save_small(checkpointer, 1)
  checkpointer.close()
  half_written = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # how orbax names one being written
  (half_written / "state").mkdir(parents=True)
  (half_written / "state" / "partial").write_bytes(b"\0" * 10)
  reader = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)  # e.g. sampling beside training
  assert reader.latest_step() == 1 and half_written.exists()  # a reader never deletes a save
  reader.close()
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  assert checkpointer.latest_step() == 1
  restored = checkpointer.restore({"w": np.zeros((3,), np.float32)})
  np.testing.assert_array_equal(restored["w"], [1, 1, 1])
  checkpointer.close()
  assert not half_written.exists()


def big_state(step):
  return {"w": np.arange(4096, dtype=np.float32) * step, "b": np.full((7,), step, np.float32)}


def data_files(folder):
  """The array data files of a checkpoint (the chunks TensorStore decompresses on restore)."""
  return sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"
                and p.stat().st_size > 256)


def flip_bytes(path, offset=None):
  data = bytearray(path.read_bytes())
  offset = len(data) // 2 if offset is None else offset
  data[offset:offset + 8] = bytes(b ^ 0xFF for b in data[offset:offset + 8])
  path.write_bytes(bytes(data))


def digests(folder):
  return {p.relative_to(folder): checkpointing.file_sha256(str(p))
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["flip", "truncate", "unsealed_flip"])
def test_a_corrupt_checkpoint_is_named_moved_aside_and_the_intact_one_restored(tmp_path, damage,
                                                                               capsys):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  for step in (1, 2):
    checkpointer.save(step, big_state(step))
  checkpointer.close()
  assert checkpointing.is_sealed(str(tmp_path / "2"))
  target = data_files(tmp_path / "2")[0]
  if damage == "truncate":
    target.write_bytes(target.read_bytes()[:-10])
  else:
    flip_bytes(target)
  if damage == "unsealed_flip":  # e.g. a crash between the save and its seal: orbax's read fails
    (tmp_path / "2" / checkpointing.SEAL).unlink()
  intact = digests(tmp_path / "1")
  damaged = digests(tmp_path / "2")
  abstract = {"w": np.zeros((4096,), np.float32), "b": np.zeros((7,), np.float32)}

  for reader in (checkpointing.Checkpointer(str(tmp_path), max_to_keep=3),  # sampling: never moves
                 checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True,
                                            on_corrupt="error")):
    with pytest.raises(errors.InputError, match=r"checkpoint .*/2 is corrupt: .*Intact checkpoints: \[1\]"):
      reader.restore(abstract)
    reader.close()
  assert digests(tmp_path / "2") == damaged

  owner = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  restored = owner.restore(abstract)
  np.testing.assert_array_equal(restored["w"], big_state(1)["w"])
  message = capsys.readouterr().out
  expected = {"flip": "has changed since it was written", "truncate": "bytes, sealed at",
              "unsealed_flip": "unreadable"}[damage]
  assert f"{tmp_path}/2 is corrupt: " in message and expected in message
  assert "restoring checkpoint 1" in message
  if damage != "unsealed_flip":
    assert str(target.relative_to(tmp_path / "2")) in message
  assert owner.all_steps() == [1] and digests(tmp_path / "corrupt-2") == damaged
  assert digests(tmp_path / "1") == intact
  owner.save(2, big_state(2))  # the step is free again; the corrupt copy stays where it was moved
  owner.close()
  assert digests(tmp_path / "corrupt-2") == damaged and checkpointing.is_sealed(str(tmp_path / "2"))


def test_retention_removes_an_old_checkpoint_only_once_a_newer_one_is_sealed(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1, remove_half_written=True)
  checkpointer.save(1, big_state(1))
  checkpointer.save(2, big_state(2))  # seals 1; keeps it while 2 is being written
  assert checkpointing.is_sealed(str(tmp_path / "1"))
  checkpointer.wait()  # 2 sealed: now 1 may go
  assert checkpointer.all_steps() == [2] and checkpointing.is_sealed(str(tmp_path / "2"))
  checkpointer.close()


def test_a_sealed_checkpoint_that_fails_to_restore_for_another_reason_is_not_moved(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  checkpointer.save(1, big_state(1))
  checkpointer.close()
  owner = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  with pytest.raises(errors.InputError, match="does not match this model"):
    owner.restore({"w": np.zeros((8,), np.float32), "b": np.zeros((7,), np.float32)})
  owner.close()
  assert (tmp_path / "1").exists() and not list(tmp_path.glob("corrupt-*"))


SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys
import numpy as np
from medim_jax import cli
from medim_jax.training import checkpointing
cli.configure_logs(debug=False)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # Python ignores SIGXFSZ: EFBIG
checkpointer = checkpointing.Checkpointer(sys.argv[1], max_to_keep=3, remove_half_written=True)
try:
  checkpointer.save(2, {"w": np.random.RandomState(2).rand(300_000).astype(np.float32)})
  checkpointer.close()
except cli.USER_ERRORS as e:
  cli.exit_with(e, debug=False)
"""


def test_a_save_the_disk_refuses_is_one_error_and_the_previous_checkpoint_stays(tmp_path):
  state = {"w": np.random.RandomState(1).rand(300_000).astype(np.float32)}  # ~1.2 MB, incompressible
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  checkpointer.save(1, state)
  checkpointer.close()
  intact = digests(tmp_path / "1")

  result = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert result.stderr.startswith(f"error: saving checkpoint {tmp_path}/2 failed"), result.stderr[-3000:]
  assert "File too large" in result.stderr and "Intact checkpoints: [1]" in result.stderr
  assert "resume from checkpoint 1" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
  assert list(tmp_path.glob(f"2{checkpointing.TMP_MARKER}*"))  # what the refused save left

  owner = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, remove_half_written=True)
  assert owner.all_steps() == [1] and not list(tmp_path.glob(f"*{checkpointing.TMP_MARKER}*"))
  np.testing.assert_array_equal(owner.restore({"w": np.zeros_like(state["w"])})["w"], state["w"])
  owner.close()
  assert digests(tmp_path / "1") == intact
