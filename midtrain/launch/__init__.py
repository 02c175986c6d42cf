"""Launching runs: embedded local Ray, an existing Ray cluster, Slurm."""
