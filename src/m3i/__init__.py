"""m3i: all-in-one, single-stage pre-training by maximising multi-modal mutual information."""

import os

__version__ = "0.1.0"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # m3i's own files (whose warnings and frames are m3i's)
