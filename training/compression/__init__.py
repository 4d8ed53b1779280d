"""The compression method: clusters (i-vectors, SSL features), activation statistics, speaker neurons,
protection and structured FFN pruning."""
