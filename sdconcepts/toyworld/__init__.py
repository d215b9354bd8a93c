"""The toy world: a procedurally drawn world, its probe classifier, the small SD-1.x model trained on it
(`model_training`), and where the shipped examples trained for it are (`examples`). Its command is
`sdconcepts.cli.toyworld_commands`."""
