"""Experiments and figures. One module per figure or experiment; `fig_*` modules register figures.

Nothing imports this package (imports flow experiments -> scale -> toy -> theory)."""
