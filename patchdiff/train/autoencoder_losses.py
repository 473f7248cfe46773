"""The KL autoencoder's objective, its PatchGAN discriminator and reconstruction PSNR: pure
functions of arrays, no config inside.

The recipe is latent diffusion's first stage (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3 and Appendix G; the `LPIPSWithDiscriminator` of
CompVis/latent-diffusion): a pixel reconstruction loss, a small KL pull of q(z|x) towards N(0, I),
and a patch-based adversarial loss (Isola et al. 2017, pix2pix's PatchGAN) with the hinge loss
(Lim & Ye 2017). LDM also adds LPIPS (Zhang et al. 2018) to the reconstruction and scales the
adversarial term adaptively; LPIPS is left out here (its VGG weights would have to be
downloaded), and the adversarial weight is fixed.

Glossary: B batch, H/W image height/width, C image channels, h/w latent height/width (H/f, W/f),
Cz latent channels, f downsampling factor.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

DISC_NORMS = ("group", "none")
# PSNR of an exact reconstruction is infinite; the per-image MSE is floored here (100 dB on a
# peak of 1) so that one exact image cannot make the average infinite.
MIN_MSE = 1e-10


def reconstruction_terms(x, recon) -> dict:
    """{"l1": |x - x̂|, "l2": (x - x̂)^2}, each the mean over pixels and batch; x, x̂ [B, H, W, C]."""
    diff = x.astype(jnp.float32) - recon.astype(jnp.float32)
    return {"l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(jnp.square(diff))}


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions, averaged over the
    batch (LDM's `kl()` then `sum / batch`); mean, logvar [B, h, w, Cz] -> []. The model's
    encode_moments clamps logvar as LDM's DiagonalGaussianDistribution does."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    per_dim = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per_dim) / mean.shape[0]


class PatchDiscriminator(nn.Module):
    """pix2pix's `NLayerDiscriminator` (as LDM and taming-transformers use it): 4x4
    convolutions, `layers` of them with stride 2, then one with stride 1 and a 1-channel logits
    map [B, H / 2^layers - 2, W / 2^layers - 2, 1], each logit judging one receptive-field patch
    (34 pixels for 2 layers, 70 for 3). GroupNorm (or none) stands in for pix2pix's BatchNorm,
    which would add running statistics to the state and a batch-wide coupling across devices."""

    channels: int = 64
    layers: int = 3
    norm: str = "group"  # DISC_NORMS

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, h', w', 1]
        def conv(features, stride, bias=True):
            # N(0, 0.02) weights: pix2pix's `weights_init`, kept by LDM.
            init = nn.initializers.normal(0.02)
            pad = ((1, 1), (1, 1))
            return nn.Conv(features, (4, 4), stride, pad, use_bias=bias, kernel_init=init)

        x = nn.leaky_relu(conv(self.channels, 2)(x), 0.2)
        for n in range(1, self.layers + 1):
            width = self.channels * min(2**n, 8)
            # A norm's shift makes the bias redundant (pix2pix drops it before its BatchNorm).
            x = conv(width, 2 if n < self.layers else 1, bias=self.norm == "none")(x)
            if self.norm == "group":
                # Groups of at least 4 channels, at most 32 groups, always dividing the width.
                x = nn.GroupNorm(num_groups=math.gcd(32, max(width // 4, 1)))(x)
            x = nn.leaky_relu(x, 0.2)
        return conv(1, 1)(x)


def hinge_discriminator_loss(logits_real, logits_fake):
    """0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x̂))]): LDM's `hinge_d_loss`."""
    return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake):
    """-E[D(x̂)]: the generator's side of the hinge loss (LDM's `g_loss`)."""
    return -jnp.mean(logits_fake)


def to_uint8(images):
    """[-1, 1] -> uint8 by EDM's rule, as `report.to_uint8` does on the host, in jnp."""
    return jnp.clip(images.astype(jnp.float32) * 127.5 + 128, 0, 255).astype(jnp.uint8)


def psnr_per_image(x, recon) -> dict:
    """PSNR of each image, x and x̂ [B, H, W, C] in [-1, 1] (x̂ already clipped): "psnr" over
    the [0, 1] range, and "psnr_uint8" between the uint8-quantised images (peak 255), the
    figure one gets from saved PNGs. -> {name: [B]}."""
    axes = tuple(range(1, x.ndim))
    mse = jnp.mean(jnp.square((x - recon) / 2.0), axis=axes)
    q = jnp.mean(jnp.square(to_uint8(x).astype(jnp.float32) - to_uint8(recon)), axis=axes)
    return {
        "psnr": -10.0 * jnp.log10(jnp.maximum(mse, MIN_MSE)),
        "psnr_uint8": 10.0 * jnp.log10(255.0**2 / jnp.maximum(q, MIN_MSE * 255.0**2)),
    }


def select(flag, new, old):
    """`new` where the scalar `flag` holds, `old` elsewhere, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)
