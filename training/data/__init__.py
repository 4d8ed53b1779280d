"""Data: the synthetic corpus, real-speech pools, channels, conversations and acoustic features."""
