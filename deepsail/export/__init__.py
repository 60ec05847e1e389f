"""Exports: a deepsail model as files other runtimes load (GGUF for llama.cpp, ONNX, torch.export)."""
