"""Reports over compression results: one self-contained HTML file and a Markdown summary with plots
(see :mod:`modelpress.report.render`). matplotlib loads only when a figure is drawn."""
