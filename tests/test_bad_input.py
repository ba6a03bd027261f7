"""Bad input, wherever a user gives it: one clear error naming the thing and the fix, and the shards
and checkpoints already on disk are left exactly as they were."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from medim_jax import errors, jobs
from medim_jax.tokenizers import text as text_tokenizers
from tests.test_shards_and_pipeline import folders_config, make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_hashes(directory):
  """sha256 of every file below ``directory``, by relative path."""
  hashes = {}
  for folder, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(folder, name)
      hashes[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return hashes


def config_for(root, **data_overrides):
  config = folders_config(root)  # shards in WORKDIR/shards
  config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = 2, 2, 2
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Folders, their shards and a 2-step checkpoint (the run a user's mistake must not damage), and
  a pristine copy of them to restore before each test. Shards record their folders' absolute paths,
  so every test works at the same place."""
  base = tmp_path_factory.mktemp("bad_input")
  root = base / "data"
  for name, count in (("a_train", 30), ("a_test", 4), ("b_train", 24), ("b_val", 6)):
    make_folder(root / name, count, len(name) + count)
  jobs.run(config_for(root), str(root / "run"), "tokenize")
  jobs.run(config_for(root), str(root / "run"), "train")
  shutil.copytree(root, base / "pristine")
  return root, base / "pristine"


@pytest.fixture
def run(trained):
  """The trained run, as it was, to make mistakes on; checks afterwards that nothing was touched."""
  root, pristine = trained
  shutil.rmtree(root)
  shutil.copytree(pristine, root)
  workdir = root / "run"
  snapshot = {}

  def take_snapshot():
    snapshot.update(shards=tree_hashes(workdir / "shards"),
                    checkpoints=tree_hashes(workdir / "checkpoints"))

  take_snapshot()
  yield root, workdir, take_snapshot
  assert tree_hashes(workdir / "shards") == snapshot["shards"]
  assert tree_hashes(workdir / "checkpoints") == snapshot["checkpoints"]


def first_train_shard(workdir):
  return sorted((workdir / "shards").glob("chest.train-*"))[0]


def test_a_sequence_length_other_than_the_shards_is_refused(run):
  root, workdir, _ = run
  with pytest.raises(errors.InputError, match=r"made with other data settings \(data.text_length\)"):
    jobs.run(config_for(root, text_length=16), str(workdir), "train")


def test_a_report_too_long_for_the_text_segment_names_the_file(run):
  root, workdir, _ = run
  config = config_for(root, text_length=8, truncate_reports=False, shards_dir=str(workdir / "short"))
  with pytest.raises(errors.InputError, match=r"case\d+\.txt needs \d+ tokens; the text segment "
                                              r"holds 8 \(raise data.text_length"):
    jobs.run(config, str(workdir), "tokenize")
  assert not (workdir / "short").exists()  # no half-written shard folder


def test_a_text_tokenizer_other_than_the_shards_is_refused(run):
  root, workdir, _ = run
  other = str(root / "other.model")
  text_tokenizers.train_sentencepiece(
      [p.read_text() for p in (root / "a_train").glob("*.txt")] * 3, other, vocab_size=50)
  with pytest.raises(errors.InputError, match="data.text_tokenizer"):
    jobs.run(config_for(root, text_tokenizer=other), str(workdir), "train")


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256 in the manifest: it is corrupt; restore it or re-run"),
    ("truncate", "has 100 bytes"),
])
def test_a_corrupt_or_truncated_shard_is_named(run, damage, message):
  root, workdir, take_snapshot = run
  shard = first_train_shard(workdir)
  with open(shard, "r+b") as f:
    if damage == "flip":
      f.seek(os.path.getsize(shard) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
    else:
      f.truncate(100)
  take_snapshot()  # the damage is the user's; training must not add to it
  with pytest.raises(errors.InputError, match=f"{shard}.*{message}"):
    jobs.run(config_for(root), str(workdir), "train")


def test_an_unreadable_image_is_named_and_the_old_shards_stay(run):
  root, workdir, _ = run
  (root / "a_train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (root / "a_train" / "broken.txt").write_text("upper left finding.")
  with pytest.raises(errors.InputError, match=r"a_train/broken.png: image cannot be read"):
    jobs.run(config_for(root, on_bad_pair="error"), str(workdir), "tokenize")


def test_an_empty_dataset_folder_is_named(run):
  root, workdir, _ = run
  (root / "empty").mkdir()
  config = config_for(root, shards_dir=str(workdir / "fresh"))
  config.data.datasets.chest.train = str(root / "empty")
  with pytest.raises(errors.InputError, match=r"empty: no usable image \+ report pairs .* 'chest'"):
    jobs.run(config, str(workdir), "tokenize")


@pytest.mark.parametrize("change, message", [
    (("model", "d_model", 48), r"does not match this model: params/\S+ is \(.*\) there but \(.*\) here"),
    (("train", "ema_decay", 0.9), r"lacks ema_params/\S+ .*which this run needs"),
    (("train", "batch_size", 4), r"data iterator was saved for .*resume with the same data, batch "
                                 "size and seed"),
])
def test_a_checkpoint_from_another_model_or_run_is_refused(run, change, message):
  root, workdir, _ = run
  config = config_for(root)
  group, key, value = change
  config[group][key] = value
  config.train.num_steps = 4
  with pytest.raises(errors.InputError, match=message):
    jobs.run(config, str(workdir), "train")


def test_a_mesh_the_devices_cannot_make_is_refused(run):
  root, workdir, _ = run
  config = config_for(root)
  config.mesh.num_devices, config.mesh.data = 0, 3  # the tests have 8 devices
  with pytest.raises(errors.InputError, match=r"data=3 x fsdp=1 x tensor=1 needs 3 devices, but the "
                                              r"run has 8 \(set one axis to -1"):
    jobs.run(config, str(workdir), "train")


def test_the_command_line_prints_input_errors_as_one_line(run):
  root, workdir, _ = run
  # The fixture's folders config as a config file the command line can load.
  config_file = root / "folders_config.py"
  config_file.write_text(
      "import pathlib\nfrom tests.test_shards_and_pipeline import folders_config\n"
      f"def get_config():\n  return folders_config(pathlib.Path({str(root)!r}))\n")
  result = subprocess.run(
      [sys.executable, "-m", "medim_jax.main", "--config", str(config_file), "--workdir",
       str(workdir), "--mode", "train", "--config.model.d_model=48"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
  assert "Traceback" not in result.stderr
  misspelt = subprocess.run(
      [sys.executable, "-m", "medim_jax.main", "--config", str(config_file), "--workdir",
       str(workdir), "--mode", "train", "--config.train.num_step=3"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert misspelt.returncode == 1
  line, = misspelt.stderr.strip().splitlines()
  assert line.startswith(f"error: unknown config key 'train.num_step' in {config_file}; did you "
                         "mean train.num_steps")
