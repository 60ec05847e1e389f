"""Multimodal models and data: a ViT and a text encoder aligned contrastively, VQA, and captioning."""
