#!/usr/bin/env bash
# Launch one ftjax training run on every worker of a Cloud TPU VM (single host or pod slice).
#
# Usage:
#   scripts/launch_tpu.sh TPU_NAME ZONE CONFIG WORKDIR [OVERRIDE ...]
#
# Example:
#   scripts/launch_tpu.sh my-v5p-64 us-east5-a configs/lora_sft.py:rank=16 \
#       gs://my-bucket/runs/lora-llama-r16 --config.model.init_from=hf:/mnt/models/llama \
#       --config.optimizer.learning_rate=2e-4
#
# What it does, on all workers at once (gcloud ... ssh --worker=all):
#   1. copies this checkout (tracked + untracked, not ignored files) to ~/$REMOTE_DIR,
#   2. installs requirements.txt (if present) and JAX for TPU,
#   3. runs `python -m ftjax.main --config CONFIG --workdir WORKDIR OVERRIDES...`.
# Every worker runs the same command; ftjax.sharding.initialize_distributed() lets JAX find the
# other workers from the TPU metadata server, so no coordinator address is needed. WORKDIR must
# be shared by all workers (a gs:// bucket), since checkpoints are written collectively.
#
# Environment knobs:
#   PROJECT=...        gcloud project (default: gcloud's configured project)
#   REMOTE_DIR=ftjax   checkout location on the workers, relative to $HOME
#   SKIP_SYNC=1        do not copy the local checkout (code already on the workers)
#   SKIP_INSTALL=1     do not pip install
#   JAX_TPU_SPEC=...   pip requirement for JAX on TPU (default: "jax[tpu]")
#   LOG=train.log      per-worker log file, in REMOTE_DIR (output is also streamed here)
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi

TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
OVERRIDES=("$@")
REMOTE_DIR=${REMOTE_DIR:-ftjax}
JAX_TPU_SPEC=${JAX_TPU_SPEC:-jax[tpu]}
LOG=${LOG:-train.log}

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && COMMON+=(--project "$PROJECT")

if [[ "$WORKDIR" != gs://* ]]; then
  echo "warning: WORKDIR '$WORKDIR' is not a gs:// path; on a multi-host pod every worker" \
       "must see the same directory." >&2
fi

ssh_all() {  # run a shell command on every worker
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command "$1"
}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -z "${SKIP_SYNC:-}" ]]; then
  TARBALL=$(mktemp -t ftjax-XXXXXX.tar.gz)
  trap 'rm -f "$TARBALL"' EXIT
  # Ship exactly what git would track (including new files), never workdirs or caches.
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -czf "$TARBALL" -T -)
  echo "copying $(du -h "$TARBALL" | cut -f1) of code to all workers of $TPU_NAME ..."
  "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:/tmp/ftjax.tar.gz" "${COMMON[@]}" --worker=all
  ssh_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/ftjax.tar.gz -C ~/$REMOTE_DIR"
fi

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  ssh_all "cd ~/$REMOTE_DIR && python3 -m pip install -q -U pip && \
    { [ ! -f requirements.txt ] || python3 -m pip install -q -r requirements.txt; } && \
    python3 -m pip install -q -U $(printf '%q' "$JAX_TPU_SPEC")"
fi

# Quote every argument so configs with ':' ',' '=' and spaces survive the remote shell.
TRAIN_CMD=$(printf '%q ' python3 -m ftjax.main --config "$CONFIG" --workdir "$WORKDIR" \
  "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
echo "running on all workers: $TRAIN_CMD"
ssh_all "cd ~/$REMOTE_DIR && set -o pipefail && $TRAIN_CMD 2>&1 | tee $(printf '%q' "$LOG")"
