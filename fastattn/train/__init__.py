"""Reference GPT training: data pipeline, pretraining loop and CLI (`python -m fastattn.train`)."""
