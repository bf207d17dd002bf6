# rules for similarity (to be written)
