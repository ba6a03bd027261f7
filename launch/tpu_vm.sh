#!/usr/bin/env bash
# Train MeDiM on a Cloud TPU VM slice (see launch/README.md).
#
# Creates the slice as a queued resource (spot by default), copies this checkout (or clones a git
# URL) onto every worker, installs the project with jax[tpu] in a Python 3.11 venv, mounts a GCS
# bucket (gcsfuse) as the shared workdir, runs `python -m medim_jax.main` on all workers at once with
# their output streamed here and saved under LOG_DIR, and deletes the slice when the script exits
# (KEEP_SLICE=1 keeps it). A spot slice taken away mid-run is recreated up to MAX_RESTARTS times;
# training resumes from the last checkpoint in the bucket.
#
#   GCS_BUCKET=my-bucket launch/tpu_vm.sh --dry-run     # print every command, run nothing
#   PROJECT=my-project ZONE=us-east5-a GCS_BUCKET=my-bucket launch/tpu_vm.sh -- --config.train.num_steps=1000
#
# Arguments after `--` go to medim_jax.main. Every knob below can be set in the environment.
set -euo pipefail

PROJECT="${PROJECT:-}"                       # empty: gcloud's configured project
ZONE="${ZONE:-us-east5-a}"                   # a zone with v5p capacity for your project
ACCELERATOR="${ACCELERATOR:-v5p-16}"         # gcloud's slice name (v5p-16 = 8 chips on 2 hosts)
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"  # v5p; v5e: v2-alpha-tpuv5-lite, v4: tpu-ubuntu2204-base
PROVISIONING="${PROVISIONING:-spot}"         # spot | on-demand | reserved
TPU_NAME="${TPU_NAME:-medim-${USER:-user}-${ACCELERATOR}}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"
WAIT_MINUTES="${WAIT_MINUTES:-180}"          # how long to wait in the queue for the slice
MAX_RESTARTS="${MAX_RESTARTS:-3}"            # recreations after the slice is preempted mid-run
KEEP_SLICE="${KEEP_SLICE:-0}"                # 1: do not delete the slice on exit

SOURCE="${SOURCE:-copy}"                     # copy: this checkout's files; git: clone GIT_URL
GIT_URL="${GIT_URL:-}"
GIT_REF="${GIT_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-medim_jax}"        # on each worker, under the home directory
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"     # the project needs >= 3.11; TPU images ship 3.10
JAX_VERSION="${JAX_VERSION:-0.10.2}"         # the version medim_jax.aot checked the configs with

GCS_BUCKET="${GCS_BUCKET:-}"                 # required: checkpoints must outlive the slice
MOUNT="${MOUNT:-/mnt/medim}"                 # where the bucket is mounted on every worker
CONFIG="${CONFIG:-configs/tpu_v5p.py:${ACCELERATOR}}"
WORKDIR="${WORKDIR:-${MOUNT}/runs/${TPU_NAME}}"
SHARDS_DIR="${SHARDS_DIR:-}"                 # tokenized shards; "" = the config's data.shards_dir
MODE="${MODE:-train}"
LOG_DIR="${LOG_DIR:-runs/logs}"              # here (git ignores runs/): one log file per run

DRY_RUN=0
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (main.py flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[tpu_vm $(date +%H:%M:%S)] $*" >&2; }

# Prints the command, and runs it unless --dry-run.
run() {
  printf '+' >&2; printf ' %q' "$@" >&2; printf '\n' >&2
  if ((DRY_RUN == 0)); then "$@"; fi
}

gcloud_tpu() {
  local args=(gcloud compute tpus "$@" --zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then args+=(--project="$PROJECT"); fi
  run "${args[@]}"
}

on_workers() {  # on_workers COMMAND: runs the shell command on every worker at once
  gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker=all --command="$1" \
    --ssh-flag="-o ServerAliveInterval=60" --ssh-flag="-o ServerAliveCountMax=10"
}

# ---------------------------------------------------------------------------------------------
# The slice

create_slice() {
  local flags=()
  case "$PROVISIONING" in
    spot) flags+=(--spot) ;;
    reserved) flags+=(--reserved) ;;
    on-demand) ;;
    *) echo "error: PROVISIONING=$PROVISIONING: use spot, on-demand or reserved" >&2; exit 2 ;;
  esac
  say "asking for $ACCELERATOR ($PROVISIONING) as queued resource $QUEUED_RESOURCE"
  gcloud_tpu queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" ${flags[@]+"${flags[@]}"}
}

slice_state() {  # ACTIVE, WAITING_FOR_RESOURCES, ..., or GONE; a dry run pretends it came up
  if ((DRY_RUN)); then echo "${DRY_RUN_STATE:-ACTIVE}"; return; fi
  local args=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE"
              --format="value(state.state)")
  if [[ -n "$PROJECT" ]]; then args+=(--project="$PROJECT"); fi
  "${args[@]}" 2>/dev/null || echo GONE
}

wait_until_active() {
  local deadline=$((SECONDS + WAIT_MINUTES * 60)) state
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE) say "slice $TPU_NAME is up"; return 0 ;;
      FAILED|SUSPENDED|GONE) echo "error: queued resource $QUEUED_RESOURCE is $state" >&2; return 1 ;;
    esac
    if ((SECONDS > deadline)); then
      echo "error: no $ACCELERATOR after $WAIT_MINUTES minutes (state $state)" >&2; return 1
    fi
    say "queued resource is $state; waiting"
    sleep 60
  done
}

delete_slice() {  # delete_slice [force]: force ignores KEEP_SLICE (a preempted slice is useless)
  if ((KEEP_SLICE)) && [[ "${1:-}" != force ]]; then
    say "KEEP_SLICE=1: leaving $TPU_NAME running (delete: gcloud compute tpus queued-resources delete $QUEUED_RESOURCE --zone=$ZONE --force)"
    return
  fi
  say "deleting $QUEUED_RESOURCE and its slice"
  gcloud_tpu queued-resources delete "$QUEUED_RESOURCE" --force --quiet || true
}

worker_count() {
  if ((DRY_RUN)); then echo 2; return; fi
  local args=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format=json)
  if [[ -n "$PROJECT" ]]; then args+=(--project="$PROJECT"); fi
  "${args[@]}" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))'
}

# ---------------------------------------------------------------------------------------------
# The project on every worker

ship_code() {
  if [[ "$SOURCE" == git ]]; then
    [[ -n "$GIT_URL" ]] || { echo "error: SOURCE=git needs GIT_URL" >&2; exit 2; }
    on_workers "rm -rf ~/$REMOTE_DIR && git clone --depth 1 --branch $(printf %q "$GIT_REF") $(printf %q "$GIT_URL") ~/$REMOTE_DIR"
    return
  fi
  # The tracked and not-ignored files of this checkout: no venv, workdirs or caches.
  local scratch archive
  scratch="$(mktemp -d)"
  archive="$scratch/medim-src.tar.gz"
  run bash -c "git ls-files -z --cached --others --exclude-standard | xargs -0 tar czf $(printf %q "$archive")"
  gcloud_tpu tpu-vm scp "$archive" "$TPU_NAME:medim-src.tar.gz" --worker=all
  on_workers "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf ~/medim-src.tar.gz -C ~/$REMOTE_DIR"
  rm -rf "$scratch"
}

install_project() {
  # uv brings its own Python 3.11 (the TPU images have 3.10); jax[tpu] brings the matching libtpu.
  on_workers "set -e; cd ~/$REMOTE_DIR
    command -v uv >/dev/null || python3 -m pip install --quiet --user uv
    export PATH=\$HOME/.local/bin:\$PATH
    uv venv --quiet --allow-existing --python $PYTHON_VERSION .venv
    uv pip install --quiet --python .venv/bin/python -e '.[tpu]' 'jax[tpu]==$JAX_VERSION'
    .venv/bin/python -c 'import jax, libtpu; print(\"jax\", jax.__version__, \"libtpu\", libtpu.__version__)'"
}

mount_bucket() {
  # The workdir is shared by all workers (Orbax writes one checkpoint from every host) and outlives
  # the slice. --rename-dir-limit: Orbax renames a finished checkpoint's temporary directory.
  on_workers "set -e
    if ! command -v gcsfuse >/dev/null; then
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $GCS_BUCKET $MOUNT"
}

train_on_all_workers() {
  local workers="$1" log="$2" distributed=0 args
  if ((workers > 1)); then distributed=1; fi
  args=(--config "$CONFIG" --workdir "$WORKDIR" --mode "$MODE")
  if [[ -n "$SHARDS_DIR" ]]; then args+=("--config.data.shards_dir=$SHARDS_DIR"); fi
  args+=(${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})  # (bash 3.2, macOS: an empty array is "unbound")
  local quoted
  quoted="$(printf ' %q' "${args[@]}")"
  say "training on $workers workers; log: $log"
  # MEDIM_DISTRIBUTED=1: medim_jax.parallel.distributed starts jax.distributed, which finds the
  # other workers through the TPU VM metadata.
  on_workers "cd ~/$REMOTE_DIR && MEDIM_DISTRIBUTED=$distributed PYTHONUNBUFFERED=1 .venv/bin/python -m medim_jax.main$quoted" \
    2>&1 | tee -a "$log"
}

# ---------------------------------------------------------------------------------------------

main() {
  [[ -n "$GCS_BUCKET" ]] || {
    echo "error: set GCS_BUCKET (the bucket that holds shards and checkpoints; the slice's disks go with it)" >&2
    exit 2; }
  local log=/dev/null
  if ((DRY_RUN == 0)); then
    mkdir -p "$LOG_DIR"
    log="$LOG_DIR/${TPU_NAME}-$(date +%Y%m%d-%H%M%S).log"
  fi
  trap delete_slice EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local attempt=0 status
  while true; do
    # A slice kept from an earlier run (KEEP_SLICE=1) is used again.
    if [[ "$(DRY_RUN_STATE=GONE slice_state)" != ACTIVE ]]; then create_slice; fi
    wait_until_active
    ship_code
    install_project
    mount_bucket
    status=0
    train_on_all_workers "$(worker_count)" "$log" || status=$?
    if ((status == 0)); then say "done: $MODE finished; workdir $WORKDIR"; return 0; fi
    # A preempted spot slice is no longer ACTIVE; anything else is a failure of the run itself.
    if [[ "$(slice_state)" == ACTIVE ]] || ((attempt >= MAX_RESTARTS)); then
      echo "error: training exited with $status (log: $log)" >&2
      return "$status"
    fi
    attempt=$((attempt + 1))
    say "slice lost (restart $attempt of $MAX_RESTARTS): recreating; training resumes from $WORKDIR"
    delete_slice force
  done
}

main
