"""Texts for calibration and evaluation (readers in :mod:`.sources`, shipped texts in ``bundled/``)."""
