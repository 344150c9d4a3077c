"""SparseGPT (Frantar & Alistarh, 2023): maths in ``sparsegpt.py``, recipe stage in ``method.py``."""
