# megamoe images. Two targets:
#   docker build --target cpu  -t megamoe:cpu  .   python slim + the CPU build of torch; runs the demo by default:
#   docker run --rm megamoe:cpu                     (tiny Mixtral on 4 gloo ranks, about 6 minutes on 2 cores)
#   docker build --target cuda -t megamoe:cuda .   NGC PyTorch (CUDA, NCCL, Transformer Engine) + megamoe[gpu]
#   docker run --gpus all --ipc=host --rm megamoe:cuda bash examples/mixtral/train_mixtral_8x7b.sh ...
# The pinned torch matches the README's set-up; override with --build-arg TORCH=... / CUDA_BASE=...
ARG CUDA_BASE=nvcr.io/nvidia/pytorch:25.10-py3

FROM python:3.11-slim AS cpu
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
WORKDIR /workspace/megamoe
# The CPU wheel first: a bare torch requirement would pull the multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}"
COPY setup.py README.md ./
COPY megamoe ./megamoe
RUN pip install -e ".[logging]"
COPY . .
CMD ["bash", "examples/mixtral/train_tiny_cpu.sh"]

FROM ${CUDA_BASE} AS cuda
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /workspace/megamoe
COPY setup.py README.md ./
COPY megamoe ./megamoe
# The base image's torch and Transformer Engine are kept (setup.py accepts a torch range); grouped_gemm is built
# against them.
RUN pip install --no-build-isolation -e ".[logging,gpu]"
COPY . .
CMD ["bash"]
