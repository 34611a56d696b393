#!/usr/bin/env bash
# Mixtral 8x7B pretraining, with Megatron-LM's launch-script layout and flags (a Megatron script runs with at most
# its data paths changed). Sizes can be overridden from the environment (the tests run it tiny with --mock-data).
# Usage: CHECKPOINT_PATH=... TOKENIZER_MODEL=... DATA_PATH=... bash examples/mixtral/train_mixtral_8x7b.sh [flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${SLURM_NNODES:-${NNODES:-1}}
NODE_RANK=${NODE_RANK:-0}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
DATA_PATH=${DATA_PATH:-}

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
                  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
MODEL_ARGS=(
    --use-mcore-models --disable-bias-linear --seq-length "${SEQ_LENGTH:-4096}"
    --max-position-embeddings "${MAX_POSITION_EMBEDDINGS:-32768}" --num-layers "${NUM_LAYERS:-32}"
    --hidden-size "${HIDDEN_SIZE:-4096}" --ffn-hidden-size "${FFN_HIDDEN_SIZE:-14336}"
    --num-attention-heads "${NUM_ATTENTION_HEADS:-32}" --init-method-std 0.01 --attention-dropout 0.0
    --hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope --swiglu
    --untie-embeddings-and-output-weights --group-query-attention --num-query-groups "${NUM_QUERY_GROUPS:-8}"
    --no-masked-softmax-fusion --no-position-embedding
)
MOE_ARGS=(
    --num-experts "${NUM_EXPERTS:-8}" --expert-model-parallel-size "${EP:-8}" --moe-router-load-balancing-type aux_loss
    --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm
)
DATA_ARGS=(--split 99990,8,2)
[ -n "$TOKENIZER_MODEL" ] && DATA_ARGS+=(--tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL")
[ -n "$DATA_PATH" ] && DATA_ARGS+=(--data-path "$DATA_PATH")
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}" --global-batch-size "${GLOBAL_BATCH_SIZE:-256}" --lr 1e-4
    --train-iters "${TRAIN_ITERS:-500000}" --lr-decay-iters "${LR_DECAY_ITERS:-320000}" --lr-decay-style cosine
    --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters "${LR_WARMUP_ITERS:-500}" --clip-grad 1.0 --bf16
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-4}" --sequence-parallel
    --use-distributed-optimizer
)
LOGGING_ARGS=(--log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10)
[ -n "$CHECKPOINT_PATH" ] && LOGGING_ARGS+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
                                            --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" --no-load-optim
                                            --no-load-rng)
if [ -n "${WANDB_API_KEY:-}" ]; then
    LOGGING_ARGS+=(--wandb-project "${WANDB_PROJECT:-Mixtral}" --wandb-exp-name "${WANDB_NAME:-Mixtral_8x7B}")
fi

"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
