"""Training: model build, optimizer and learning-rate schedules, train loop, metrics."""
