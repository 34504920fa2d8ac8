"""One module per command: prune, distill, evaluate, export, run (recipes), demo and
build_assets. Each takes its config object (difcompress/config.py) and orchestrates the
lower layers; none of them imports another command except `run` and `demo`, which chain them."""
