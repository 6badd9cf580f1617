# The ELBO-VAE baseline (Kingma & Welling, 2014): a Gaussian encoder q(z|x), the per-image KL to N(0, I)
# in place of the MMD, and everything else as the MMD-VAE default, so the two differ only in the divergence.
# 12 epochs: the run the README's results table measured (the default has 16 since).
#   python train.py config/elbo.py
stochastic_encoder = True
kl_weight = 1.0
mmd_weight = 0.0
epochs = 12
