"""The Hydra config tree, shipped inside the wheel as `pipeline.conf` (found through `pkg://pipeline.conf`)."""
