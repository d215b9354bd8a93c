"""The toy world: a procedurally drawn world, its probe classifier, and the small SD-1.x model trained on it."""
