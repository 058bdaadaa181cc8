"""The pipeline's stages: one module each, one entry function that the CLI and dvc.yaml call."""
