# rules for super_resolution (to be written)
