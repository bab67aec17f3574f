#!/usr/bin/env bash
# Train every variant the paper reports for one dataset and backbone, one run after the other.
#   train_scripts/paper_grid.sh {stl10|cifar100|imagenet} {resnet18|mobilenetv2} [NPROC]
set -euo pipefail
DATASET=${1:?dataset: stl10, cifar100 or imagenet}
BACKBONE=${2:?backbone: resnet18 or mobilenetv2}
NPROC=${3:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ "$BACKBONE" = resnet18 ]; then PATTERNS="2222 4222"; STOCK=1222; else PATTERNS="2222121 4222121"; STOCK=1222121; fi
MODELS="${BACKBONE}_skip_${STOCK}"
for pattern in $PATTERNS; do
  for pool in skip maxp lip gaussian_pool nlp_headfix2 nlp_headfix2_nowin; do
    MODELS="$MODELS ${BACKBONE}_${pool}_${pattern}"
  done
done
for model in $MODELS; do
  "$HERE/train.sh" "$HERE/${DATASET}_${BACKBONE}.yaml" "$NPROC" --model "$model" --experiment "${DATASET}-${model}"
done
