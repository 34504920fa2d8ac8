"""Model families: one adapter per architecture, so the stages stay family-agnostic.

``base`` is the interface; ``unet2d``, ``dit`` and ``t2i`` are the adapters; ``registry`` finds the
adapter for a model or a class name; ``sampling`` is the family-agnostic sampler.
(Nothing is imported here: the adapters build on difcompress.pruning, which builds on
``base``, so this package's namespace stays empty to keep that order one-way.)
"""
