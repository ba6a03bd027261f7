"""Tokenize -> ArrayRecord shards -> grain, on tiny paired folders written by the tests."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import demo as demo_config
from medim_jax import errors
from medim_jax.data import pipeline, shards, tokenize

WORDS = ("left", "right", "upper", "lower", "nodule", "effusion", "opacity", "clear")


def make_folder(folder, count, seed, size=16):
  """Pairs of a bright square on a dark field and a sentence saying where it is."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True)
  for i in range(count):
    image = np.full((size, size, 3), 20, np.uint8)
    row, col = rng.integers(0, 2, 2)
    image[row * 8:row * 8 + 8, col * 8:col * 8 + 8] = (230, 200, 40)
    Image.fromarray(image).save(folder / f"case{i:03d}.png")
    words = rng.choice(WORDS, size=rng.integers(3, 7))
    (folder / f"case{i:03d}.txt").write_text(
        f"{('upper', 'lower')[row]} {('right', 'left')[col]} finding. " + " ".join(words) + ".")


def folders_config(root, shards_dir="", vocab=80):
  config = demo_config.get_config("tiny")
  config.data.name = "folders"
  config.data.image_size = 16
  config.data.patch_pixels = 4
  config.data.image_codebook_size = 8
  config.data.text_vocab_size = vocab
  config.data.text_length = 32
  config.data.records_per_shard = 16
  config.data.shards_dir = shards_dir
  config.data.datasets.chest.train = str(root / "a_train")
  config.data.datasets.chest.test = str(root / "a_test")
  config.data.datasets.pathology.train = str(root / "b_train")
  config.data.datasets.pathology.val = str(root / "b_val")
  return config


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  make_folder(root / "a_train", 60, 0)
  make_folder(root / "a_test", 10, 1)
  make_folder(root / "b_train", 40, 2)
  make_folder(root / "b_val", 10, 3)
  return root


@pytest.fixture(scope="module")
def shard_dir(folder_root, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("run") / "shards")
  tokenize.tokenize(folders_config(folder_root, directory), "unused", progress=False)
  return directory


def file_hashes(directory):
  return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
          for name in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, name))}


def test_shard_rows_round_trip(folder_root, shard_dir):
  manifest = shards.read_manifest(shard_dir)
  assert manifest["counts"]["pathology"] == {"train": 40, "val": 10, "test": 0}
  chest = manifest["counts"]["chest"]
  assert chest["train"] + chest["val"] == 60 and chest["test"] == 10 and chest["val"] > 0
  shards.verify(shard_dir)

  dataset = pipeline.ShardDataset([shard_dir])
  text_tok, image_tok = dataset.text_tokenizer, dataset.image_tokenizer
  index = [json.loads(line) for line in open(os.path.join(shard_dir, "index.jsonl"))]
  assert sorted(r["example_id"] for r in index) == list(range(len(index))) == list(range(120))
  folder_of = {("chest", "train"): "a_train", ("chest", "val"): "a_train", ("chest", "test"): "a_test",
               ("pathology", "train"): "b_train", ("pathology", "val"): "b_val"}
  for split in ("train", "val", "test"):
    rows = dataset.read_split(split)
    for row in range(len(rows["example_id"])):
      entry = index[rows["example_id"][row]]
      assert entry["split"] == split
      folder = folder_root / folder_of[entry["dataset"], split]
      report = (folder / f"{entry['name']}.txt").read_text()
      prompt = manifest["datasets"][entry["dataset"]]["prompt"]
      n = rows["prompt_length"][row]
      assert n == len(text_tok.tokenize(prompt))
      assert text_tok.decode(rows["text"][row]) == f"{prompt} {report}"
      assert text_tok.decode(rows["text"][row][n:]) == report
      assert rows["text_mask"][row].sum() == len(text_tok.tokenize(f"{prompt} {report}")) + 1
      original = np.asarray(Image.open(folder / f"{entry['name']}.png").convert("RGB"))
      np.testing.assert_array_equal(rows["image"][row], image_tok.encode(original[None])[0])


def test_mixing_shards_of_other_tokenizers_is_refused(folder_root, shard_dir, tmp_path):
  other = str(tmp_path / "other")
  tokenize.tokenize(folders_config(folder_root, other, vocab=60), "unused", progress=False)
  with pytest.raises(shards.ShardError, match="another text tokenizer.*cannot be mixed"):
    pipeline.ShardDataset([shard_dir, other])
  before = file_hashes(shard_dir)
  with pytest.raises(shards.ShardError, match="Refusing to replace them"):
    tokenize.tokenize(folders_config(folder_root, shard_dir, vocab=60), "unused", progress=False)
  assert file_hashes(shard_dir) == before  # nothing on disk was touched


def test_tokenize_never_replaces_a_folder_that_holds_no_shards(folder_root, tmp_path):
  precious = tmp_path / "my_data"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(shards.ShardError, match="not empty and holds no shards"):
    tokenize.tokenize(folders_config(folder_root, str(precious)), "unused", progress=False)
  assert (precious / "notes.txt").read_text() == "keep me"


def test_truncated_shard_file_is_named(shard_dir, tmp_path):
  import shutil
  copy = str(tmp_path / "copy")
  shutil.copytree(shard_dir, copy)
  name = next(f["name"] for f in shards.read_manifest(copy)["files"] if f["split"] == "train")
  with open(os.path.join(copy, name), "r+b") as f:
    f.truncate(100)
  with pytest.raises(shards.ShardError, match=f"{name} has 100 bytes.*truncated"):
    pipeline.ShardDataset([copy]).sources("train")


def next_batches(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_grain_iterator_resumes_to_the_same_next_batches(shard_dir):
  dataset = pipeline.ShardDataset([shard_dir])
  iterator = dataset.train_iterator(batch_size=8, seed=3)
  next_batches(iterator, 13)  # more than one epoch of pathology (40 rows)
  state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it
  expected = next_batches(iterator, 6)

  resumed = pipeline.ShardDataset([shard_dir]).train_iterator(batch_size=8, seed=3)
  resumed.set_state(state)
  for want, got in zip(expected, next_batches(resumed, 6)):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])

  ids = np.concatenate([b["example_id"] for b in expected])
  index = [json.loads(line) for line in open(os.path.join(shard_dir, "index.jsonl"))]
  assert {index[i]["dataset"] for i in ids} == {"chest", "pathology"}  # both mixed in
  assert {index[i]["split"] for i in ids} == {"train"}

  other = pipeline.ShardDataset([shard_dir]).train_iterator(batch_size=4, seed=3)
  with pytest.raises(ValueError, match="same data, batch size and seed"):
    other.set_state(state)


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_host_slices_are_disjoint_and_cover_the_data(shard_dir, hosts):
  dataset = pipeline.ShardDataset([shard_dir])
  source = [s for s in dataset.sources("train") if s.dataset == "chest"]
  count = shards.read_manifest(shard_dir)["counts"]["chest"]["train"]
  seen = []
  for host in range(hosts):
    batches = pipeline.train_dataset(source, dataset.row_layout, dataset.layout, batch_size=hosts,
                                     seed=0, process_index=host, process_count=hosts,
                                     repeat=False, read_threads=0)
    seen.append(np.concatenate([b["example_id"] for b in batches]))
  everything = np.concatenate(seen)
  assert len(everything) == len(set(everything.tolist())) == count  # disjoint
  rows = dataset.read_split("train")
  chest_ids = rows["example_id"][rows["dataset_id"] == 0]
  assert set(everything.tolist()) == set(chest_ids.tolist())  # and covering


def test_batches_are_in_the_model_layout(shard_dir):
  dataset = pipeline.ShardDataset([shard_dir])
  batch = next(dataset.train_iterator(batch_size=4, seed=0))
  layout = dataset.layout
  lo, hi = layout.allowed_id_range()
  assert batch["tokens"].shape == (4, layout.seq_length)
  assert ((batch["tokens"] >= lo) & (batch["tokens"] < hi)).all()
  assert batch["valid"].all()  # padding is trained by default
  masked = pipeline.ShardDataset([shard_dir], train_on_padding=False)
  batch = next(masked.train_iterator(batch_size=4, seed=0))
  assert not batch["valid"][:, layout.text_slice].all() and batch["valid"][:, layout.image_slice].all()


def test_training_refuses_shards_made_with_other_data_settings(folder_root, shard_dir):
  from medim_jax.data import build as data_build
  config = folders_config(folder_root, shard_dir)
  assert data_build.build_dataset(config, "unused").layout.text_length == 32  # same settings: fine
  config.data.patch_pixels = 8
  config.data.datasets.chest.prompt = "another prompt."
  with pytest.raises(ValueError, match=r"other data settings \(data.datasets, data.patch_pixels\)"):
    data_build.build_dataset(config, "unused")


def test_finding_oversample_draws_labelled_examples_k_times_as_often(tmp_path):
  """Examples with a finding in labels.jsonl are drawn k times as often as those without; the
  dataset's share of the mixture and datasets without labels are unchanged."""
  make_folder(tmp_path / "a_train", 60, 0)
  make_folder(tmp_path / "b_train", 40, 2)
  positive = {f"case{i:03d}" for i in range(0, 60, 4)}
  with open(tmp_path / "a_train" / "labels.jsonl", "w") as f:
    for i in range(60):
      f.write(json.dumps({"name": f"case{i:03d}", "labels": {"nodule": f"case{i:03d}" in positive,
                                                              "effusion": False}}) + "\n")
  config = folders_config(tmp_path, str(tmp_path / "shards"))
  config.data.datasets.chest.test = config.data.datasets.pathology.val = ""
  tokenize.tokenize(config, "unused", progress=False)
  index = {r["example_id"]: r for r in map(json.loads, open(tmp_path / "shards" / "index.jsonl"))}
  weights = {"chest": 2.0, "pathology": 1.0}

  plain = pipeline.ShardDataset([str(tmp_path / "shards")], weights)
  assert [(s.dataset, s.rows) for s in plain.sources("train")] == [("chest", None), ("pathology", None)]
  oversampled = pipeline.ShardDataset([str(tmp_path / "shards")], weights, finding_oversample=3.0)
  sources = oversampled.sources("train")
  assert [(s.dataset, s.part) for s in sources] == [
      ("chest", "with findings"), ("chest", "without findings"), ("pathology", "")]
  assert sources[0].weight + sources[1].weight == pytest.approx(2.0)
  assert sources[2].weight == 1.0 and sources[2].rows is None

  counts = {"with": 0, "without": 0, "pathology": 0}
  seen = set()
  iterator = oversampled.train_iterator(batch_size=30, seed=0)
  for _ in range(100):
    for example in next(iterator)["example_id"]:
      entry = index[int(example)]
      if entry["dataset"] == "pathology":
        counts["pathology"] += 1
      else:
        counts["with" if entry["name"] in positive else "without"] += 1
        seen.add(entry["name"])
  with_rows, without_rows = len(sources[0].rows), len(sources[1].rows)
  assert with_rows + without_rows == shards.read_manifest(str(tmp_path / "shards"))["counts"]["chest"]["train"]
  expected = 3 * with_rows / (3 * with_rows + without_rows)
  chest = counts["with"] + counts["without"]
  assert counts["with"] / chest == pytest.approx(expected, abs=0.05)
  assert chest / 3000 == pytest.approx(2 / 3, abs=0.04)
  assert seen & positive == {e["name"] for e in index.values()  # every one of them is drawn
                             if e["dataset"] == "chest" and e["split"] == "train"} & positive

  with pytest.raises(errors.InputError, match="finding_oversample"):
    pipeline.ShardDataset([str(tmp_path / "shards")], weights, finding_oversample=0.0)


def read_rows(paths):
  import grain
  records = grain.sources.ArrayRecordDataSource(list(paths)) if paths else []
  return [records[i] for i in range(len(records))]


def test_a_text_only_dataset_adds_report_rows_and_leaves_the_paired_rows_as_they_were(
    folder_root, shard_dir, tmp_path, capsys):
  reports = tmp_path / "reports"
  reports.mkdir()
  for i, text in enumerate(["clear lungs. no effusion.", "upper left nodule.",
                            "left " * 40, "opacity right lower."]):  # the third: too long
    (reports / f"r{i}.txt").write_text(text)
  (reports / "empty.txt").write_text("  ")
  Image.new("L", (8, 8)).save(reports / "r1.png")  # said to be left unused, not an error
  config = folders_config(folder_root, str(tmp_path / "shards"))
  config.data.datasets.notes = dict(train=str(reports), prompt="chest x-ray.", weight=1.0,
                                    text_only=True)
  manifest = tokenize.tokenize(config, "unused", progress=False)
  assert f"{reports}: dataset 'notes' is text_only, so its 1 image file(s) are not used" in (
      capsys.readouterr().out)
  assert manifest["counts"]["notes"] == {"train": 3, "val": 0, "test": 0}
  assert manifest["text_only_left_out_too_long"] == {"notes": 1}
  assert any("empty.txt: report is empty" in line for line in manifest["skipped"])
  assert manifest["datasets"]["notes"]["text_only"] is True
  before = shards.read_manifest(shard_dir)
  assert manifest["tokenizers"] == before["tokenizers"]  # fitted on the paired data only
  for name in ("chest", "pathology"):
    for split in ("train", "val", "test"):
      assert manifest["counts"][name] == before["counts"][name]
      ours = shards.split_files(str(tmp_path / "shards"), manifest, split, name)
      theirs = shards.split_files(shard_dir, before, split, name)
      assert read_rows(ours) == read_rows(theirs)

  dataset = pipeline.ShardDataset([str(tmp_path / "shards")], weights={"notes": 50.0})
  layout = dataset.layout
  assert "notes" not in set(dataset.split("val").dataset) | set(dataset.split("train").dataset)
  batch = next(dataset.train_iterator(batch_size=16, seed=0))
  no_image = ~batch["valid"][:, layout.image_slice].any(1)
  assert no_image.sum() >= 8 and batch["valid"][~no_image].all()  # notes are ~92% of draws
  assert not batch["valid"][no_image][:, layout.image_slice].any()
  lo, hi = layout.allowed_id_range()
  assert ((batch["tokens"] >= lo) & (batch["tokens"] < hi)).all()  # in range, never scored

  config.data.datasets.notes.test = str(reports)
  with pytest.raises(errors.InputError, match="notes is text_only: it only trains"):
    tokenize.source_folders(config)
  for name in ("chest", "pathology"):
    config.data.datasets[name].update(dict(text_only=True, val="", test=""))
  config.data.datasets.notes.test = ""
  with pytest.raises(errors.InputError, match="every configured dataset .* is text_only"):
    tokenize.tokenize(config, "unused", progress=False)

  no_reports = tmp_path / "no_reports"
  no_reports.mkdir()
  config = folders_config(folder_root, str(tmp_path / "shards_empty"))
  config.data.datasets.notes = dict(train=str(no_reports), text_only=True)
  with pytest.raises(errors.InputError, match=f"{no_reports}: no usable reports \\(NAME.txt\\) for "
                                              "text-only training dataset 'notes'"):
    tokenize.tokenize(config, "unused", progress=False)
