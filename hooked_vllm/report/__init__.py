"""Reports and figures: takes results, gives pictures.

``html`` writes the self-contained ``report.html`` of a run (with ``figures``, its plotly figures, and
``explorer``, the per-item views computed from the model and drawn by ``explorer.js``); ``viz`` holds
the matplotlib figures for notebooks (saliency over an image, the logit lens on the image grid,
patching heatmaps, attention patterns).
"""
