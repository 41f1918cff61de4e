"""The machinery that runs the method: model loading, processes (DDP, DeepSpeed ZeRO-3),
checkpoints, the run folder and logging. Nothing here imports ``mgpo.core``."""
