"""The ROI report of holdout experiments, and the pre-launch simulation."""
