# rules for adaptation (to be written)
