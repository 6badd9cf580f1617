"""The MMD-VAE encoder/decoder: one module, DCGAN-style convolutions.

Architecture after the InfoVAE authors' MMD-VAE tutorial (Zhao et al.,
arXiv:1706.02262; ermongroup.github.io/blog/a-tutorial-on-mmd-variational-autoencoders):

    encoder  1x28x28 -conv/2-> C x14x14 -conv/2-> 2C x7x7 -fc-> hidden -fc-> z
    decoder  z -fc-> hidden -fc-> 2C x7x7 -convT*2-> C x14x14 -convT*2-> 1x28x28

Widths are constructor arguments: a small network trains in minutes on a laptop
CPU, a wide one fills a GPU. With stochastic=True the encoder outputs a Gaussian
q(z|x) = N(mu, diag(exp(logvar))) and samples it by reparameterisation, so the
ELBO-VAE baseline and InfoVAE mixes share this module. The hybrid preset's critics
live in critics.py; this module is the whole MMD-VAE.

    model = MMDVAE(latent_dim=8)
    z = model.encode(x)           # x: (N, 1, 28, 28) in [0, 1] -> (N, latent_dim)
    x_hat = model.decode(z)       # -> (N, 1, 28, 28) in [0, 1]
    model = MMDVAE(**ckpt["model_args"])   # rebuild from a checkpoint
"""
import torch
from torch import nn


class MMDVAE(nn.Module):
    def __init__(self, latent_dim=8, channels=32, hidden=512, stochastic=False):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("channels", channels), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.latent_dim, self.stochastic = latent_dim, bool(stochastic)
        # The arguments that rebuild this exact network; saved in every checkpoint.
        self.model_args = dict(latent_dim=latent_dim, channels=channels, hidden=hidden,
                               stochastic=self.stochastic)
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1), nn.LeakyReLU(0.1),       # 28 -> 14
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.1),   # 14 -> 7
            nn.Flatten(),
            nn.Linear(2 * c * 7 * 7, hidden), nn.LeakyReLU(0.1),
            # A stochastic encoder emits a mean and a log-variance per latent unit.
            nn.Linear(hidden, 2 * latent_dim if stochastic else latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * c * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (2 * c, 7, 7)),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(),  # 7 -> 14
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1),                 # 14 -> 28, logits
        )

    def encode_distribution(self, x):
        """(mu, logvar) of q(z|x); logvar is None for the deterministic encoder."""
        h = self.encoder(x)
        if not self.stochastic:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def encode(self, x):
        """The latent code of x: the mean of q(z|x), shape (N, latent_dim)."""
        return self.encode_distribution(x)[0]

    @staticmethod
    def reparameterize(mu, logvar):
        # z = mu + sigma * eps keeps the sample differentiable in mu and logvar (Kingma & Welling, 2014).
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode_logits(self, z):
        """Pre-sigmoid pixel values; the training loss uses these for numerical stability."""
        return self.decoder(z)

    def decode(self, z):
        """Pixel intensities in [0, 1], shape (N, 1, 28, 28)."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x):
        """Returns (logits of the reconstruction, z, mu, logvar); z is sampled only in training mode."""
        mu, logvar = self.encode_distribution(x)
        z = self.reparameterize(mu, logvar) if (logvar is not None and self.training) else mu
        return self.decode_logits(z), z, mu, logvar
