"""`--mode summary`: what the configured network costs at each stem patch size.

Prints parameters and XLA-counted forward GFLOPs per image at P = 1, 2, 4 (attention kept at the
same U-Net levels, see `config.with_patch_size`), so that the effect of the patchify stem is
visible before any training.
"""

from patchdiff import config as config_lib
from patchdiff.models.cost import model_cost
from patchdiff.tables import format_table

PATCH_SIZES = (1, 2, 4)


def network_variant(config, patch_size: int):
    """`config` with stem patch size P (attention at the same levels) and no patch-training
    schedule, validated: cost is the network's alone, and the smallest training crops may not fit
    a deep stem. Raises ConfigError where P does not fit the resolution and depth."""
    variant = config_lib.with_patch_size(config, patch_size)
    variant.diffusion.patch_scales, variant.diffusion.patch_probs = (1.0,), (1.0,)
    return config_lib.validate(variant)


def cost_rows(config, patch_sizes=PATCH_SIZES) -> list[dict]:
    """One row per patch size that this resolution and depth allow."""
    rows = []
    for p in patch_sizes:
        try:
            variant = network_variant(config, p)
        except config_lib.ConfigError as e:
            print(f"P={p}: skipped, {e}")
            continue
        cost = model_cost(variant)
        rows.append(
            {
                "patch_size": p,
                "params_M": cost["params"] / 1e6,
                "gflops_per_image": cost["gflops_per_image"],
            }
        )
    return rows


# One line on each network's shape, by config.model.name.
DESCRIBE = {
    "unet": lambda m: (
        f"channels {m.channels} x {tuple(m.channel_mult)}, {m.num_res_blocks} blocks per level"
    ),
    "dit": lambda m: (
        f"depth {m.dit.depth}, width {m.dit.width}, {m.dit.heads} heads, {m.dit.pos_embed} "
        "positions"
    ),
    "hdit": lambda m: (
        f"widths {tuple(m.hdit.widths)}, depths {tuple(m.hdit.depths)}, heads of "
        f"{m.hdit.head_dim}, neighborhood {m.hdit.neighborhood_kernel or 'off'}"
    ),
}


def summarize(config) -> list[dict]:
    config_lib.validate(config)
    m = config.model
    print(
        f"{m.name}: {DESCRIBE[m.name](m)}, patch {m.patch_size}, resolution "
        f"{config.data.resolution}, {config.data.channels} channels"
    )
    rows = cost_rows(config)
    print(format_table(rows))
    return rows
