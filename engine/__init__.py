"""The training loop shared by every task: `engine.loop.run(cfg)` is what train.py calls."""
