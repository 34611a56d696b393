#!/usr/bin/env bash
# A fairseq-style MoE: top-2 gating with a capacity (drops by probability), fairseq's sampled second expert, MoE in
# every second layer, and fairseq's evaluation capacity as a token fraction. Uses --mock-data unless DATA_PATH
# and TOKENIZER_MODEL are set; sizes overridable.
# Usage: bash examples/fairseq/train_fairseq_moe.sh [more pretrain_gpt.py flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ -n "${DATA_PATH:-}" ]; then
    DATA_ARGS=(--tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL" --data-path "$DATA_PATH")
else
    DATA_ARGS=(--mock-data --vocab-size 4096)
fi
MODEL_ARGS=(
    --num-layers "${NUM_LAYERS:-4}" --hidden-size "${HIDDEN_SIZE:-256}" --num-attention-heads 8
    --seq-length "${SEQ_LENGTH:-256}" --max-position-embeddings "${SEQ_LENGTH:-256}" --disable-bias-linear
    --hidden-dropout 0.1 --attention-dropout 0.1
)
MOE_ARGS=(
    --num-experts "${NUM_EXPERTS:-8}" --moe-router-topk 2 --moe-second-expert-policy sampling
    --moe-expert-capacity-factor 1.0 --moe-token-drop-policy probs --moe-eval-capacity-token-fraction 0.25
    --moe-layer-freq 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01
    --moe-token-dispatcher-type allgather
)
TRAINING_ARGS=(
    --micro-batch-size 2 --global-batch-size "${GLOBAL_BATCH_SIZE:-8}" --train-iters "${TRAIN_ITERS:-100}"
    --lr 5e-4 --lr-decay-style inverse-square-root --lr-warmup-iters "${LR_WARMUP_ITERS:-10}" --clip-grad 0.1 --adam-eps 1e-6
    --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-50}" --eval-iters 2
)
PARALLEL_ARGS=(--expert-model-parallel-size "${EP:-2}")

"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt.py "${MODEL_ARGS[@]}" \
    "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "$@"
