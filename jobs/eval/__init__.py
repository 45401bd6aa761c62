"""Evaluation of pretrained encoders: kNN monitor, linear probe on frozen features, fine-tuning helpers."""
