"""nanotune: the Python sidecar that loads Hugging Face causal LMs in PyTorch and
applies NanoAdam ("Pay Attention to Small Weights", NeurIPS 2025) for the
TypeScript controller. docs/architecture.md describes how the pieces fit."""

__version__ = "0.1.0"
