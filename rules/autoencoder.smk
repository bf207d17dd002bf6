# rules for autoencoder (to be written)
