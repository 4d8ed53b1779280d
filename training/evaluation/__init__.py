"""Evaluation and calibration of exported models: verification, decisions on real audio, cohorts,
score calibration, robustness and diarization scoring."""
