"""One module per command: prune, distill, evaluate, export, stats, run (recipes), demo and
build_assets, plus model_card (the README export writes). Each takes its config object
(difcompress/config.py) and orchestrates the lower layers; a command imports another only
to chain it (`run`, `demo` and `build_assets` run the stages; `export` writes its card
with `model_card`)."""
