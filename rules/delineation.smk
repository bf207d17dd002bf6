# rules for delineation (to be written)
