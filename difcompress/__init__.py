"""difcompress: make diffusers models small enough for consumer GPUs."""

__version__ = "0.1.0"
