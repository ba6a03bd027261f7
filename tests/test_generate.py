"""Generating from a user's own inputs: the Python API and the command, on a tiny trained run."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cli_env import cli_env

from medim_jax import errors, inference, jobs
from tests.test_shards_and_pipeline import folders_config, make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run_config(root):
  config = folders_config(root)
  config.data.datasets.chest.prompt = "chest x-ray."
  config.sample.batch_size = 4
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  make_folder(root / "a_train", 24, 0)
  make_folder(root / "a_test", 4, 1)
  make_folder(root / "b_train", 8, 2)
  make_folder(root / "b_val", 4, 3)
  config = tiny_run_config(root)
  workdir = str(root / "run")
  jobs.run(config, workdir, "tokenize")
  jobs.run(config, workdir, "train")
  return root, workdir, inference.MeDiMPipeline.from_workdir(workdir)


def test_the_run_s_own_config_is_read_from_its_workdir(run):
  root, workdir, pipe = run
  expected = tiny_run_config(root)
  expected.data.verify_shards = False  # the pipeline reads only the tokenizers and the layout
  assert pipe.config.to_dict() == expected.to_dict() and pipe.step == 4
  assert inference.MeDiMPipeline.from_workdir(workdir, step=2).step == 2


def test_each_task_gives_images_and_reports(run):
  root, _, pipe = run
  images = pipe.report_to_image(["upper left finding.", "lower right finding."])
  assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
  film = Image.open(root / "a_test" / "case000.png").resize((40, 30))  # any size: padded, resized
  reports = pipe.image_to_report([film, np.asarray(film), str(root / "a_test" / "case001.png")])
  assert len(reports) == 3 and all(isinstance(r, str) for r in reports)
  # A PIL image and its array are the same film: the same codes.
  np.testing.assert_array_equal(pipe.image_codes([film])[0], pipe.image_codes([np.asarray(film)])[0])
  images, reports = pipe.joint(["upper", ""])
  assert len(images) == len(reports) == 2 and reports[0].startswith("upper")
  # The condition cache is a sampler setting like any other; refreshed every step it changes nothing.
  uncached = pipe.image_to_report([film], details=True)
  every_step = pipe.image_to_report([film], details=True, condition_cache_every=1)
  np.testing.assert_array_equal(every_step.tokens, uncached.tokens)
  assert isinstance(pipe.image_to_report([film], condition_cache_every=2)[0], str)
  # Each dataset's report prompt goes first, as in its training rows.
  for name, prompt in (("chest", "chest x-ray."), ("pathology", "histopathology.")):
    ids = pipe.text_tokenizer.tokenize(prompt)
    assert list(pipe.report_rows(["upper"], name)[0, :len(ids)]) == ids


def test_confidences_cover_exactly_the_generated_tokens(run):
  _, _, pipe = run
  out = pipe.joint(["upper left"], details=True)
  assert out.image_confidence.shape == (1, 4, 4)
  assert ((out.image_confidence > 0) & (out.image_confidence <= 1)).all()
  pieces = out.report_confidence[0]
  assert "".join(text for text, _ in pieces) == out.reports[0]
  given = len(pipe.text_tokenizer.tokenize("upper left"))
  assert all(np.isnan(p) for _, p in pieces[:given])
  assert all(0 < p <= 1 for _, p in pieces[given:])
  report_to_image = pipe.report_to_image(["upper left finding."], details=True)
  assert all(np.isnan(p) for _, p in report_to_image.report_confidence[0])
  assert np.isfinite(report_to_image.image_confidence).all()


def test_a_sample_depends_on_its_input_place_and_seed_not_on_the_batch(run):
  _, _, pipe = run
  reports = ["upper left finding.", "lower left finding.", "upper right finding."]
  together = pipe.generate(pipe.report_rows(reports), seed=3).tokens
  with pipe.config.unlocked():
    pipe.config.sample.batch_size = 1
  try:
    one_by_one = pipe.generate(pipe.report_rows(reports), seed=3).tokens
  finally:
    with pipe.config.unlocked():
      pipe.config.sample.batch_size = 4
  np.testing.assert_array_equal(together, one_by_one)
  np.testing.assert_array_equal(pipe.generate(pipe.report_rows(reports[:1]), seed=3).tokens[0],
                                together[0])  # the same input at the same place
  other_seed = pipe.generate(pipe.report_rows(reports), seed=4).tokens
  assert (other_seed != together).any()


def test_infill_keeps_every_given_word_and_fills_every_blank(run):
  _, _, pipe = run
  ids, blank = pipe.template_ids("upper ___ finding. [MASK:2] square.", None, 3)
  assert blank.sum() == 5
  row = pipe._rows(1)
  row[0, pipe.layout.text_slice] = ids
  out = pipe.generate(row, seed=0).tokens[0, pipe.layout.text_slice]
  np.testing.assert_array_equal(out[~blank], ids[~blank])
  assert (out[blank] != pipe.layout.mask_id).all() and (out[blank] < pipe.layout.mask_id).all()
  image, report = pipe.infill("upper ___ finding.")
  assert isinstance(image, Image.Image) and report.startswith("upper")


def test_an_image_edit_changes_only_the_masked_tokens(run):
  root, _, pipe = run
  film = Image.open(root / "a_test" / "case001.png")
  mask = np.zeros((16, 16), bool)
  mask[:, :8] = True  # the left half: token columns 0-1 of the 4 x 4 grid
  redraw = inference.mask_to_tokens(mask, (16, 16), pipe.grid, "pad")
  assert redraw.reshape(4, 4)[:, :2].all() and not redraw.reshape(4, 4)[:, 2:].any()
  codes = pipe.image_codes([film])[0][0]
  row = pipe.infill_row(image=film, image_mask=mask, report="upper left finding.")
  out = pipe.generate(row[None], seed=1)
  edited = out.tokens[0, pipe.layout.image_slice]
  np.testing.assert_array_equal(edited[~redraw], pipe.layout.image_ids(codes)[~redraw])
  assert np.isnan(out.image_confidence[0].reshape(-1)[~redraw]).all()
  assert np.isfinite(out.image_confidence[0].reshape(-1)[redraw]).all()
  # A mask over a film of another shape goes through the same pad-and-resize as the film.
  wide = inference.mask_to_tokens(np.pad(mask, ((0, 0), (0, 16))), (16, 32), pipe.grid, "pad")
  assert not wide.reshape(4, 4)[:1].any() and wide.reshape(4, 4)[1:3, :1].all()
  image, _ = pipe.infill(image=film, image_mask=mask, report="upper left finding.")
  assert image.size == (16, 16)


def test_bad_inputs_are_one_clear_error_each(run, tmp_path):
  root, workdir, pipe = run
  cases = [
      (lambda: pipe.report_to_image(["  "]), "report 1 is empty"),
      (lambda: pipe.report_to_image("one report"), "reports: give a list"),
      (lambda: pipe.report_ids("upper " * 40, None), r"report needs \d+ tokens; the text segment holds 32"),
      (lambda: pipe.image_to_report([str(root / "a_test" / "case000.txt")]), "case000.txt: image cannot be read"),
      (lambda: pipe.image_to_report([np.zeros((4, 4), np.float32)]), "expected a uint8 array"),
      (lambda: pipe.infill(image=np.zeros((16, 16, 3), np.uint8), image_mask=np.ones((8, 8), bool)),
       "the image mask is 8x8 pixels, the image 16x16"),
      (lambda: pipe.infill(image=np.zeros((16, 16, 3), np.uint8), image_mask=np.zeros((16, 16), bool)),
       "marks no pixel"),
      (lambda: pipe.infill("no blanks here."), "has no blank"),
      (lambda: pipe.report_to_image(["upper"], tempature=2.0), "sampler settings"),
      (lambda: pipe.report_to_image(["upper"], dataset="brain"), r"unknown dataset 'brain'; this "
       r"model was trained on \['chest', 'pathology'\]"),
      (lambda: inference.MeDiMPipeline.from_workdir(str(tmp_path)), "has no checkpoints/"),
  ]
  other = tiny_run_config(root)
  other.model.d_model = 48
  cases.append((lambda: inference.MeDiMPipeline.from_workdir(workdir, config=other), "is not of the model"))
  with pipe.config.unlocked():
    pipe.config.data.truncate_reports = False  # True (the demo's setting) truncates with a warning
  try:
    for call, message in cases:
      with pytest.raises(errors.InputError, match=message):
        call()
  finally:
    with pipe.config.unlocked():
      pipe.config.data.truncate_reports = True
  assert (pipe.report_ids("upper " * 40, None) != pipe.layout.mask_id).all()


def tree_digest(folder):
  digest = hashlib.sha256()
  for base, _, names in sorted(os.walk(folder)):
    for name in sorted(names):
      with open(os.path.join(base, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def test_the_command_writes_images_and_a_record_and_nothing_on_bad_input(run, tmp_path):
  root, workdir, _ = run
  env = cli_env()
  command = lambda *args: subprocess.run(
      [sys.executable, "-m", "medim_jax.generate", "--workdir", workdir, *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  out = tmp_path / "out"
  done = command("--report", "upper left finding.", "--out", str(out), "--grid", "--dicom",
                 "--config.sample.text_steps=2", "--config.sample.image_steps=2")
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads((out / "generated.jsonl").read_text())
  assert record["task"] == "report_to_image" and record["checkpoint_step"] == 4
  assert record["model_calls"] == 2  # --config.sample.image_steps=2
  assert record["sampler"]["image_steps"] == 2 and (out / record["image_out"]).exists()
  assert np.asarray(record["image_confidence"]).shape == (4, 4) and "report_out" not in record
  assert (out / "000_confidence.png").exists() and (out / "grid.png").exists()
  import pydicom
  synthetic = pydicom.dcmread(out / record["dicom_out"])
  assert synthetic.ConversionType == "SYN" and "upper left finding." in synthetic.DerivationDescription

  films = tmp_path / "films"
  films.mkdir()
  for name in ("case000.png", "case001.png"):
    Image.open(root / "a_test" / name).save(films / name)
  read = command("--images", str(films), "--out", str(tmp_path / "read"), "--grid")
  assert read.returncode == 0, read.stderr[-2000:]
  records = [json.loads(line) for line in (tmp_path / "read" / "generated.jsonl").read_text().splitlines()]
  assert [r["image"] for r in records] == [str(films / "case000.png"), str(films / "case001.png")]
  assert all(isinstance(r["report_out"], str) and "image_out" not in r for r in records)
  assert (tmp_path / "read" / "grid.png").exists()

  before = tree_digest(workdir)
  bad_cases = [
      (("--report", ""), "error: report 1 is empty: give the report's text"),
      (("--report", "upper", "--image", str(films / "case000.png")), "error: give one kind of input"),
      (("--image", str(root / "a_test" / "case000.txt")), "case000.txt: image cannot be read"),
      (("--image", str(films / "case000.png"), "--mask", str(root / "a_test" / "case000.txt")),
       "mask cannot be read"),
      (("--report", "upper", "--step", "3"), "no checkpoint 3"),
      (("--report", "upper", "--config.sample.tempature=2"), "unknown config key 'sample.tempature'"),
  ]
  for args, message in bad_cases:
    bad = command(*args, "--out", str(tmp_path / "bad"))
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), bad.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()
  assert tree_digest(workdir) == before


KILLABLE_EVAL = """
import sys
import time
from medim_jax import inference, jobs
workdir = sys.argv[1]
config = inference.config_of_workdir(workdir)
config.eval.tasks = "image_to_report,report_to_image"
config.eval.report_metrics = False
jobs.run(config, workdir, "eval")
"""


def test_an_eval_killed_while_generating_reuses_only_the_tasks_it_finished(run):
  _, workdir, pipe = run
  generated = os.path.join(workdir, "eval", "generated")
  env = cli_env()
  command = [sys.executable, "-c", KILLABLE_EVAL, workdir]
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  finished_key = os.path.join(generated, "image_to_report", "key.txt")
  deadline = time.monotonic() + 200
  while not os.path.exists(finished_key):
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.005)
  process.kill()  # SIGKILL while the second task is generating
  process.wait()
  partial = os.path.join(generated, "report_to_image")
  assert not os.path.exists(os.path.join(partial, "key.txt"))
  os.makedirs(partial, exist_ok=True)  # as if killed while writing its tokens
  with open(os.path.join(partial, "tokens.npy"), "wb") as f:
    f.write(b"\x93NUMPY half")
  finished = tree_digest(os.path.join(generated, "image_to_report"))

  rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "image_to_report: reusing" in rerun.stdout
  assert "report_to_image: reusing" not in rerun.stdout
  assert tree_digest(os.path.join(generated, "image_to_report")) == finished
  assert np.load(os.path.join(partial, "tokens.npy")).shape[0] == 4  # made again, whole
  confidence = np.load(os.path.join(partial, "confidence.npy"))  # image tokens drawn, text given
  layout = pipe.layout
  assert np.isfinite(confidence[:, layout.image_slice]).all()
  assert np.isnan(confidence[:, layout.text_slice]).all()
  assert os.path.exists(os.path.join(partial, "key.txt"))
