#!/usr/bin/env bash
# A DeepSeek-like MoE: sigmoid router, aux-loss-free balancing (expert bias), shared experts, group-limited routing,
# many fine-grained experts. Uses --mock-data unless DATA_PATH and TOKENIZER_MODEL are set; sizes overridable.
# Usage: bash examples/deepseek/train_deepseek_like.sh [more pretrain_gpt.py flags]
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
    --seq-length "${SEQ_LENGTH:-256}" --max-position-embeddings "${SEQ_LENGTH:-256}" --normalization RMSNorm
    --position-embedding-type rope --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --hidden-dropout 0.0 --attention-dropout 0.0
)
MOE_ARGS=(
    --num-experts "${NUM_EXPERTS:-16}" --moe-ffn-hidden-size "${MOE_FFN:-128}" --moe-router-topk 4
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
    --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4
    --moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-topk-scaling-factor 2.5
    --moe-shared-expert-intermediate-size "${SHARED_FFN:-256}" --moe-layer-freq "[0,1,1,1]"
    --moe-token-dispatcher-type alltoall --moe-grouped-gemm
)
TRAINING_ARGS=(
    --micro-batch-size 2 --global-batch-size "${GLOBAL_BATCH_SIZE:-8}" --train-iters "${TRAIN_ITERS:-100}"
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters "${LR_WARMUP_ITERS:-5}" --clip-grad 1.0 --bf16
    --log-interval "${LOG_INTERVAL:-10}" --eval-interval 1000 --eval-iters 2
)
PARALLEL_ARGS=(--expert-model-parallel-size "${EP:-2}" --use-distributed-optimizer)

"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt.py "${MODEL_ARGS[@]}" \
    "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "$@"
