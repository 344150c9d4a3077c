"""Wanda (Sun et al., 2023): maths in ``wanda.py``, recipe stage in ``method.py``."""
