"""The authors' random-scale factors for training crops, shared by the data transforms and the
training config.

A module of its own so that the config (and with it every benchmark and the model) does not import
the data stack (grain, tensorflow-datasets), which GPU machines without the data extras lack.
"""

# The authors draw 0.7 + random.randint(0, 14) / 10 with Python's randint, which includes both ends.
AUTHORS_SCALES: tuple[float, ...] = tuple(round(0.7 + 0.1 * i, 1) for i in range(15))  # 0.7 .. 2.1
