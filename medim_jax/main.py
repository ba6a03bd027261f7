"""Command line: ``python -m medim_jax.main --config configs/demo.py --workdir DIR --mode all``.

Kept tiny on purpose: every mode is a library function that tests and notebooks call directly.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

MODES = ("data", "train_vq", "tokenize", "train", "sample", "score", "eval", "all")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum(
    "mode", "all", MODES,
    "data: build medim-demo; train_vq: train the VQ image tokenizer; tokenize: write shards; "
    "train; sample; score (smoke data); eval: generate on the test split, score, write report.html; "
    "all: every stage, each skipped when its output is there (smoke: train, sample, score).")
_DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the Python traceback and the "
                           "libraries' logs instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from medim_jax import cli, errors, jobs  # after flag parsing, so --help stays fast
  from medim_jax.parallel import distributed
  cli.configure_logs(_DEBUG.value)
  try:
    distributed.initialize_from_environment()  # before anything touches a device; no-op for one process
    jobs.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except cli.USER_ERRORS as e:
    cli.exit_with(e, _DEBUG.value)  # the message names the input and the fix
  except errors.Preempted as e:
    print(e, file=sys.stderr)
    # The shell's code for death by that signal, so job schedulers see a preemption, not success.
    sys.exit(128 + (e.signal_number or 15))


def run():
  from medim_jax import config_checks
  config_checks.exit_on_unknown_overrides(sys.argv[1:])
  app.run(main)


if __name__ == "__main__":
  run()
