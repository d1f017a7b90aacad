"""The label value that marks pixels to ignore, shared by the data, the loss and the metrics.

255 is the "void" value of the Cityscapes train-id maps and of the authors' ADE20K loader
(label - 1, wrapping 0 to 255); the loss leaves those pixels out and the metrics do not count them.
"""

IGNORE_LABEL = 255
