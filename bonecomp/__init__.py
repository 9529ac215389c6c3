"""bonecomp: hand-bone X-ray segmentation pipeline for the 29-bone competition."""

__version__ = "0.1.0"
