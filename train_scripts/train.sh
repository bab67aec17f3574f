#!/usr/bin/env bash
# Launch timm's train.py with the pooled models registered (--device-modules timm_nlp).
#   train_scripts/train.sh CONFIG.yaml [NPROC] [train.py args...]
# TIMM_DIR: a checkout of github.com/huggingface/pytorch-image-models (for train.py).
# NPROC processes on this node through torchrun (timm's distributed path); several nodes: set NNODES,
# NODE_RANK, MASTER_ADDR and MASTER_PORT on each. The config's batch_size is divided over all processes.
set -euo pipefail
CONFIG=${1:?usage: train.sh CONFIG.yaml [NPROC] [train.py args...]}
NPROC=${2:-1}
shift $(( $# >= 2 ? 2 : 1 ))
TIMM_DIR=${TIMM_DIR:?set TIMM_DIR to a timm repository checkout}
NNODES=${NNODES:-1}
WORLD=$(( NPROC * NNODES ))
BATCH=$(python -c "import yaml,sys; print(max(1, yaml.safe_load(open(sys.argv[1]))['batch_size'] // $WORLD))" "$CONFIG")
ARGS=(--config "$CONFIG" --device-modules timm_nlp --batch-size "$BATCH" "$@")
if [ "$WORLD" -eq 1 ]; then
  exec python "$TIMM_DIR/train.py" "${ARGS[@]}"
fi
exec torchrun --nnodes="$NNODES" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  "$TIMM_DIR/train.py" "${ARGS[@]}"
