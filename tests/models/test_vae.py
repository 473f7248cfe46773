"""The autoencoder on a tiny config: shapes, latent spaces, and the weight files it reads and
writes (diffusers folders, CompVis single files, bfloat16 tensors) with their error messages.

Agreement with diffusers' own network is checked outside CI by benchmarks/vae_diffusers.py.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from patchdiff.models.vae import (
    VAE,
    AutoencoderKL,
    VAEConfig,
    VAEError,
    from_pretrained,
    from_state_dict,
    init_vae,
    save_pretrained,
    to_state_dict,
)

# Two levels (one downsample) and one ResNet per level: the smallest config with every kind of
# layer, a 1x1 shortcut in both directions included.
TINY = VAEConfig(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4
)


@pytest.fixture(scope="module")
def vae():
    return init_vae(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def random_tensors(vae):
    """diffusers-named tensors of TINY's shapes, random (so that no layer is near zero or one)."""
    rng = np.random.default_rng(2)
    shapes = {k: v.shape for k, v in to_state_dict(vae.params, TINY).items()}
    return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def diffusers_config(config: VAEConfig, **overrides) -> dict:
    """A config.json as diffusers 0.3x writes it, with the keys we do not read."""
    n = len(config.block_out_channels)
    d = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.31.0",
        "_name_or_path": "stabilityai/sd-vae-ft-mse",
        "act_fn": "silu",
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": config.layers_per_block,
        "mid_block_add_attention": config.mid_block_add_attention,
        "norm_num_groups": config.norm_num_groups,
        "out_channels": config.out_channels,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": None,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }
    return {**d, **overrides}


def write_folder(folder, tensors, config=TINY, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(config, **overrides)))
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return folder


def compvis_name(name: str, levels: int) -> str:
    """A diffusers name as the original Stable Diffusion code has it, rewritten part by part."""
    parts = name.split(".")
    out = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in ("down_blocks", "up_blocks"):
            level = int(parts[i + 1])
            kind = parts[i + 2]
            if p == "up_blocks":  # CompVis counts the decoder's levels from the finest
                level = levels - 1 - level
            word = "down" if p == "down_blocks" else "up"
            if kind == "resnets":
                out += [word, str(level), "block", parts[i + 3]]
                i += 4
            else:  # downsamplers.0 / upsamplers.0
                out += [word, str(level), "downsample" if word == "down" else "upsample"]
                i += 4
        elif p == "mid_block":
            if parts[i + 1] == "resnets":
                out += ["mid", f"block_{int(parts[i + 2]) + 1}"]
                i += 3
            else:
                layer = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
                out += ["mid", "attn_1", layer.get(parts[i + 3], "proj_out")]
                i += 5 if parts[i + 3] == "to_out" else 4
        else:
            out.append({"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}.get(p, p))
            i += 1
    return ".".join(out)


def compvis_tensors(tensors, prefix=""):
    out = {}
    for name, value in tensors.items():
        new = compvis_name(name, len(TINY.block_out_channels))
        if ".attn_1." in new and value.ndim == 2:  # 1x1 convs in the original code
            value = value[:, :, None, None]
        out[prefix + new] = value
    return out


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# The network


def test_shapes_and_downsample_factor(vae, images, latents):
    mean, std = vae.encode_moments(images)
    assert mean.shape == std.shape == (2, 8, 8, 4) and mean.dtype == jnp.float32
    assert vae.decode(latents).shape == (2, 16, 16, 3)
    assert vae.downsample_factor == 2 and vae.latent_channels == 4
    assert VAEConfig().downsample_factor == 8
    recon, mean2, logvar = vae.module.apply({"params": vae.params}, images, jax.random.key(3))
    assert recon.shape == images.shape
    np.testing.assert_allclose(mean2, mean, atol=1e-5)
    np.testing.assert_allclose(jnp.exp(logvar / 2), std, rtol=1e-5)


def test_sample_and_mean(vae, images):
    mean, std = vae.encode_moments(images)
    np.testing.assert_array_equal(vae.encode(images), mean)
    sample = vae.encode(images, jax.random.key(4))
    np.testing.assert_array_equal(sample, vae.encode(images, jax.random.key(4)))
    noise = (sample - mean) / std
    assert 0.8 < float(jnp.std(noise)) < 1.2 and abs(float(jnp.mean(noise))) < 0.2


def test_model_space_round_trip(vae, latents):
    shifted = VAE(AutoencoderKL(VAEConfig(**{**vars(TINY), "shift_factor": 0.1})), vae.params)
    for v in (vae, shifted):
        z = v.to_model_space(latents)
        np.testing.assert_allclose(z, (latents - v.shift_factor) * v.scaling_factor, rtol=1e-6)
        np.testing.assert_allclose(v.from_model_space(z), latents, rtol=1e-5, atol=1e-6)


def test_decode_fn_inside_jit(vae, latents):
    twice = jax.jit(lambda p, z: 2 * vae.decode_fn(p, z))(vae.params, latents)
    np.testing.assert_allclose(twice, 2 * vae.decode(latents), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute(vae, images, latents):
    bf16 = VAE(AutoencoderKL(TINY, "bfloat16"), vae.params)
    mean, std = bf16.encode_moments(images)
    decoded = bf16.decode(latents)
    for ours, ref in ((mean, vae.encode(images)), (decoded, vae.decode(latents))):
        assert ours.dtype == jnp.float32 and bool(jnp.isfinite(ours).all())
        assert float(jnp.abs(ours - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_config_to_and_from_diffusers():
    config = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, shift_factor=0.1159)
    assert VAEConfig.from_diffusers(config.to_diffusers(), "x") == config
    assert VAEConfig.from_diffusers(diffusers_config(TINY), "x") == TINY
    with pytest.raises(
        VAEError, match=r"^c\.json: down_block_types must all be DownEncoderBlock2D"
    ):
        VAEConfig.from_diffusers(
            diffusers_config(TINY, down_block_types=["CrossAttnDownBlock2D"] * 2), "c.json"
        )
    with pytest.raises(VAEError, match=r"^c\.json: act_fn must be silu, found 'gelu'"):
        VAEConfig.from_diffusers(diffusers_config(TINY, act_fn="gelu"), "c.json")
    with pytest.raises(VAEError, match="norm_num_groups 32 does not divide"):
        VAEConfig(block_out_channels=(8, 16))


# ---------------------------------------------------------------------------------------------
# diffusers folders


def test_diffusers_folder(tmp_path, vae, images, latents):
    write_folder(tmp_path / "pipe" / "vae", to_state_dict(vae.params, TINY), scaling_factor=0.13025)
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):  # a pipeline's folder too
        loaded = from_pretrained(path)
        assert loaded.config == VAEConfig(**{**vars(TINY), "scaling_factor": 0.13025})
        assert_same_params(loaded.params, vae.params)
    np.testing.assert_array_equal(loaded.decode(latents), vae.decode(latents))
    np.testing.assert_array_equal(loaded.encode(images), vae.encode(images))
    assert from_pretrained(tmp_path / "pipe", scaling_factor=0.5).scaling_factor == 0.5


def test_old_attention_names(tmp_path, random_tensors):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def old(name):
        for new, was in renames.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        return name

    write_folder(tmp_path, {old(k): v for k, v in random_tensors.items()})
    assert_same_params(from_pretrained(tmp_path).params, from_state_dict(random_tensors, TINY, "x"))


def test_save_pretrained_round_trip(tmp_path, vae, random_tensors):
    params = from_state_dict(random_tensors, TINY, "x")
    first = VAE(AutoencoderKL(TINY), params)
    folder = save_pretrained(first, tmp_path / "export")
    save_pretrained(vae, folder)  # replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = from_pretrained(folder)
    assert loaded.config == TINY and loaded.source == str(folder)
    assert_same_params(loaded.params, vae.params)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "AutoencoderKL"


# ---------------------------------------------------------------------------------------------
# CompVis single files


@pytest.mark.parametrize("prefix", ["first_stage_model.", ""])
def test_compvis_single_file(tmp_path, random_tensors, prefix):
    rng = np.random.default_rng(5)
    tensors = compvis_tensors(random_tensors, prefix)
    # The rest of a Stable Diffusion checkpoint, which must be ignored.
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = rng.standard_normal((8, 4, 3, 3))
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(8)
    save_file(
        {k: np.asarray(v, np.float32) for k, v in tensors.items()}, tmp_path / "sd.safetensors"
    )

    loaded = from_pretrained(tmp_path / "sd.safetensors", norm_num_groups=4)
    assert loaded.config == TINY
    assert_same_params(loaded.params, from_state_dict(random_tensors, TINY, "x"))
    # By hand: the decoder's coarsest level is CompVis' up.1, and attention weights are [O, I].
    p = loaded.params["decoder"]
    kernel = tensors[prefix + "decoder.up.1.block.0.conv1.weight"]
    np.testing.assert_array_equal(
        p["up_0_resnet_0"]["conv1"]["kernel"], kernel.transpose(2, 3, 1, 0)
    )
    q = tensors[prefix + "decoder.mid.attn_1.q.weight"][:, :, 0, 0]
    np.testing.assert_array_equal(p["mid_attention"]["q"]["kernel"], q.T)
    assert from_pretrained(tmp_path / "sd.safetensors", norm_num_groups=4).scaling_factor == 0.18215


def write_bfloat16(path, tensors):
    """A safetensors file of bfloat16 tensors, written by hand: numpy has no bfloat16."""
    header, chunks, offset = {}, [], 0
    for name, value in tensors.items():
        bits = (np.asarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(bits)],
        }
        chunks.append(bits)
        offset += len(bits)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def test_bfloat16_file(tmp_path, random_tensors):
    # Values that bfloat16 holds exactly: the top 16 bits of each float32.
    exact = {
        k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in random_tensors.items()
    }
    write_bfloat16(tmp_path / "vae.safetensors", compvis_tensors(exact))
    loaded = from_pretrained(tmp_path / "vae.safetensors", norm_num_groups=4)
    assert_same_params(loaded.params, from_state_dict(exact, TINY, "x"))


# ---------------------------------------------------------------------------------------------
# Errors, each one sentence naming the file (and tensor)


def test_missing_path(tmp_path):
    with pytest.raises(VAEError, match=re.escape(f"{tmp_path / 'nope'}: no such file or folder.")):
        from_pretrained(tmp_path / "nope")


def test_folder_without_config_or_weights(tmp_path, random_tensors):
    save_file(random_tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(VAEError, match=re.escape(f"{tmp_path} has no config.json")):
        from_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config(TINY)))
    with pytest.raises(
        VAEError, match=re.escape(f"{tmp_path} has no diffusion_pytorch_model.safetensors")
    ):
        from_pretrained(tmp_path)


def test_truncated_file(tmp_path, random_tensors):
    weights = write_folder(tmp_path, random_tensors) / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(VAEError, match=re.escape(f"{weights} is not a readable safetensors file")):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"encoder.conv_out.bias": None},
            "tensor 'encoder.conv_out.bias' (shape (8,)) is missing.",
        ),
        (
            {"decoder.conv_in.weight": np.zeros((16, 4, 1, 1), np.float32)},
            "tensor 'decoder.conv_in.weight' has shape (16, 4, 1, 1), expected (16, 4, 3, 3).",
        ),
        (
            {"encoder.extra.weight": np.zeros(3, np.float32)},
            "tensor 'encoder.extra.weight' is not part of the VAE that the config describes",
        ),
    ],
)
def test_bad_tensor(tmp_path, random_tensors, change, message):
    tensors = {**random_tensors, **change}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    weights = write_folder(tmp_path, tensors) / "diffusion_pytorch_model.safetensors"
    with pytest.raises(VAEError, match=re.escape(f"{weights}: {message}")):
        from_pretrained(tmp_path)


def test_bad_single_file(tmp_path, random_tensors):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.2.weight": np.zeros((4, 8, 3, 3), np.float32)}, path)
    with pytest.raises(VAEError, match=re.escape(f"{path} holds no VAE tensors")):
        from_pretrained(path)
    tensors = compvis_tensors(random_tensors)
    del tensors["decoder.up.0.block.1.conv2.weight"]
    save_file(tensors, path)
    with pytest.raises(
        VAEError, match=re.escape(f"{path}: tensor 'decoder.up.0.block.1.conv2.weight'")
    ):
        from_pretrained(path, norm_num_groups=4)
    with pytest.raises(VAEError, match=re.escape(f"{path}: 32 groups do not divide")):
        from_pretrained(path)
