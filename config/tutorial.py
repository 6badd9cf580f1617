# The InfoVAE authors' MMD-VAE tutorial (TensorFlow):
#   ermongroup.github.io/blog/a-tutorial-on-mmd-variational-autoencoders
# Encoder 64 and 128 channels of 4x4 stride-2 convolutions, fc 1024, LeakyReLU 0.1; the
# mirrored decoder, sigmoid output; a deterministic z of 20 dimensions. Loss: per-pixel mean squared error + 1
# x MMD with k(x, y) = exp(-mean_d (x_d - y_d)^2 / D) against 200 prior draws, the biased estimate; Adam 1e-3,
# batch 200, 10,000 iterations. Here: summed squared error is 784 x the per-pixel mean, so mmd_weight is 784;
# the kernel exp(-||x - y||^2 / D^2) is bandwidth 2D times scale D / 2 = 10. Still different: PyTorch's weight
# initialisation, our 60,000 training images (TensorFlow's loader kept 55,000), no lr decay or weight average
# in theirs (off here too), and the ex-post prior, which this repo fits after training. Measured: see the
# README's results table.
#   python train.py config/tutorial.py
channels = 64
hidden = 1024
latent_dim = 20
recon_loss = "mse"
mmd_weight = 784.0
kernel = "gaussian"
kernel_scales = "10"
mmd_estimator = "biased"
prior_draws = 200
batch_size = 200
lr = 1e-3
lr_decay = False
ema_decay = 0.0
epochs = 34
max_steps = 10000
