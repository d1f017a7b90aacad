"""Evaluation: confusion-matrix mIoU, whole-image / sliding-window / multi-scale inference, pictures."""
