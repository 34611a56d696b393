#!/usr/bin/env bash
# The demo: a tiny Mixtral-like model (4 layers, hidden 256, GQA, RoPE, SwiGLU, 8 experts top-2) on real text that
# every machine has offline (the Python standard library's source), trained on 4 gloo ranks with tensor (2, with
# sequence parallelism), pipeline (2) and expert (2) parallelism, then saved (runs/demo/checkpoints) and plotted
# (runs/demo/plots: loss curves, per-layer expert load). About 6 minutes on 2 CPU cores.
# Usage: bash examples/mixtral/train_tiny_cpu.sh [more pretrain_gpt.py flags]   (PYTHON selects the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
RUN=${RUN:-runs/demo}
export OMP_NUM_THREADS=1

# Data: corpus -> sentencepiece tokenizer -> Megatron indexed dataset (skipped when already made).
if [ ! -f "$RUN/corpus_text_document.idx" ]; then
    "$PYTHON" tools/make_demo_corpus.py --output "$RUN/corpus.jsonl" --max-mb 20 --text-sample "$RUN/sample.txt"
    "$PYTHON" tools/train_tokenizer.py --input "$RUN/sample.txt" --model-prefix "$RUN/tok" --vocab-size 4096
    "$PYTHON" tools/preprocess_data.py --input "$RUN/corpus.jsonl" --output-prefix "$RUN/corpus" \
        --tokenizer-type Llama2Tokenizer --tokenizer-model "$RUN/tok.model" --append-eod --workers 2
fi

GPUS_PER_NODE=4
DISTRIBUTED_ARGS=(--standalone --nproc-per-node "$GPUS_PER_NODE")
MODEL_ARGS=(
    --use-mcore-models --disable-bias-linear --seq-length 256 --max-position-embeddings 256 --num-layers 4
    --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 8 --init-method-std 0.02 --attention-dropout 0.0
    --hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope --swiglu
    --untie-embeddings-and-output-weights --group-query-attention --num-query-groups 4 --no-masked-softmax-fusion
    --no-position-embedding
)
MOE_ARGS=(
    --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
    --moe-grouped-gemm --moe-token-dispatcher-type alltoall
)
DATA_ARGS=(
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$RUN/tok.model" --data-path "$RUN/corpus_text_document"
    --split 98,2,0 --num-workers 1
)
TRAINING_ARGS=(
    --micro-batch-size 4 --global-batch-size 16 --lr 1e-3 --train-iters 200 --lr-decay-iters 200
    --lr-decay-style cosine --min-lr 1e-4 --weight-decay 0.1 --lr-warmup-iters 10 --clip-grad 1.0 --bf16
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2
    --expert-model-parallel-size 2 --expert-tensor-parallel-size 1 --use-distributed-optimizer
)
LOGGING_ARGS=(--log-interval 10 --eval-interval 100 --eval-iters 4 --log-dir "$RUN/logs")
CHECKPOINT_ARGS=(--save "$RUN/checkpoints" --save-interval 100)

"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "$@"
echo "metrics: $RUN/logs/metrics.jsonl; checkpoints: $RUN/checkpoints"
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
    "$PYTHON" tools/plot_metrics.py --metrics "$RUN/logs/metrics.jsonl" --output "$RUN/plots"
else
    echo "plots skipped: matplotlib is not installed (pip install megamoe[logging])"
fi
