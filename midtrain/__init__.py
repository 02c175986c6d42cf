"""midtrain: continued pretraining from mid-training checkpoints."""

__version__ = "0.1.0"
