"""Pretraining: SSL pretraining of the testbed encoders, speaker-teacher distillation, speaker fine-tuning."""
