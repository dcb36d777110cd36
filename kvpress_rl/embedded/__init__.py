"""The embedded default: a small reasoning model and its task, so every command works offline on a CPU."""
