# rules for data (to be written)
