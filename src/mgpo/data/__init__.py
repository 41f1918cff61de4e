"""Data: records and their validation (``records.py``), images (``images.py``, with the
table files that embed them, ``tables.py``), the published benchmark layouts
(``benchmarks.py``) and the loader that turns any of them into `Sample`s (``samples.py``).
Nothing here imports the rest of the package but ``mgpo.config``."""
