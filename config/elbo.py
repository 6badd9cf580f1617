# The ELBO-VAE baseline (Kingma & Welling, 2014): a Gaussian encoder q(z|x), the per-image KL to N(0, I)
# in place of the MMD, and everything else as the MMD-VAE default, so the two differ only in the divergence.
# Measured: see the README's results table.
#   python train.py config/elbo.py
stochastic_encoder = True
kl_weight = 1.0
mmd_weight = 0.0
