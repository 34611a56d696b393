"""megamoe: Mixture-of-Experts GPT pretraining with Megatron-style 4D parallelism, on CPU and GPU."""

from setuptools import find_packages, setup

setup(
    name="megamoe",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    install_requires=[
        # A range, so an existing torch (the pinned CPU build, or an NGC image's CUDA build) is kept as it is.
        "torch>=2.6,<3",
        "numpy",
        "sentencepiece",
        "regex",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "logging": ["wandb", "tensorboard", "matplotlib"],
        # Imported only when present and on CUDA; every path has a pure-PyTorch twin.
        "gpu": ["transformer-engine", "grouped_gemm"],
        # The tests also check the writers, the plots and the Hugging Face conversion.
        "dev": ["pytest", "wandb", "tensorboard", "matplotlib", "transformers", "dockerfile"],
    },
)
