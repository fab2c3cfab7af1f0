"""m3i: all-in-one, single-stage pre-training by maximising multi-modal mutual information."""

__version__ = "0.1.0"
