"""The plan search as a Hydra sweeper (`hydra/sweeper=pipeline_search`, chosen by `+search=default`).

Shipped inside the `pipeline` source folder and mapped into Hydra's `hydra_plugins` namespace by
pyproject.toml, because Hydra instantiates only plugin classes found there.
"""
