"""Metrics, one module per family: ``similarity`` (2AFC, JND AP), ``image`` (PSNR, SSIM),
``delineation`` (completeness, correctness, quality)."""
