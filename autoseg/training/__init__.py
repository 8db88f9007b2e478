"""Training stage: splits, sampling, augmentation, losses, schedule, checkpoint, and the loop that composes them."""
