# rules for analysis (to be written)
ANALYSIS_OUTPUTS: list[str] = []
