"""Our AutoencoderKL against diffusers' with the same weights files: the same latents and images?

    python -m benchmarks.vae_diffusers --peer-python /tmp/torchenv/bin/python

or the halves by hand, the first under a Python with torch and diffusers (neither is a dependency
of this project), the second under the project's:

    /tmp/torchenv/bin/python -m benchmarks.vae_diffusers --make /tmp/vae_cmp
    python -m benchmarks.vae_diffusers --compare /tmp/vae_cmp
    /tmp/torchenv/bin/python -m benchmarks.vae_diffusers --check-export /tmp/vae_cmp

--make builds small randomly initialised diffusers AutoencoderKLs (GroupNorm affine parameters
perturbed too, so that a scale read as a bias cannot hide), saves each with diffusers'
save_pretrained, and writes the same weights as a CompVis single file (a Stable Diffusion
checkpoint: first_stage_model.* beside an unrelated model.diffusion_model.* tensor). Its CompVis
names come from renaming here, checked by diffusers' own convert_ldm_vae_checkpoint giving back
the original state dict. It records the posterior's mean and std of fixed images and the decoding
of fixed latents.
--compare loads both files with `patchdiff.models.vae.from_pretrained`, runs at the highest
matmul precision, prints max |ours - diffusers| and that over max |diffusers| for each output
(float32, and bfloat16 compute for scale), exports each model with our save_pretrained, and writes
benchmarks/results/vae_diffusers.json (or --out).
--check-export loads those exports with diffusers and decodes the same latents again.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys

import numpy as np

# name: diffusers AutoencoderKL kwargs, image size. "sd_narrow" is Stable Diffusion's VAE
# (4 levels, 2 layers, 32 groups) with a quarter of its channels; "flux_like" has FLUX's 16
# latent channels, shift factor and no quant convs, and no mid attention.
MODELS = {
    "tiny": (
        dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16),
        32,
    ),
    "sd_narrow": (dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2), 64),
    "flux_like": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
        16,
    ),
}
BLOCK_TYPES = ("DownEncoderBlock2D", "UpDecoderBlock2D")


def to_compvis(name: str, levels: int) -> str:
    """A diffusers AutoencoderKL tensor name as the original Stable Diffusion code names it."""
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2"),
        (r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample"),
        (r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}"),
        (r"mid_block\.attentions\.0", "mid.attn_1"),
        (r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{levels - 1 - int(m[1])}.block"),
        (r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{levels - 1 - int(m[1])}.upsample"),
        (r"conv_shortcut", "nin_shortcut"),
        (r"conv_norm_out", "norm_out"),
        (r"attn_1\.group_norm", "attn_1.norm"),
        (r"attn_1\.to_(q|k|v)\.", r"attn_1.\1."),
        (r"attn_1\.to_out\.0", "attn_1.proj_out"),
    ]
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def make(folder: pathlib.Path) -> None:
    import diffusers
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "models": {}}
    for name, (kwargs, size) in MODELS.items():
        torch.manual_seed(0)
        n = len(kwargs["block_out_channels"])
        vae = diffusers.AutoencoderKL(
            down_block_types=(BLOCK_TYPES[0],) * n,
            up_block_types=(BLOCK_TYPES[1],) * n,
            sample_size=size,
            **kwargs,
        ).eval()
        with torch.no_grad():
            for pname, p in vae.named_parameters():
                if "norm" in pname:
                    p.add_(0.1 * torch.randn_like(p))
        out = folder / name
        vae.save_pretrained(out / "model")

        state = {k: v.contiguous() for k, v in vae.state_dict().items()}
        compvis = {}
        for k, v in state.items():
            k = to_compvis(k, n)
            # The original code's attention layers are 1x1 convs.
            compvis[k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v
        back = convert_ldm_vae_checkpoint(
            {"first_stage_model." + k: v for k, v in compvis.items()}, dict(vae.config)
        )
        if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
            sys.exit(f"vae_diffusers: diffusers does not read our CompVis names back ({name}).")
        checkpoint = {"first_stage_model." + k: v for k, v in compvis.items()}
        checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
        save_file(checkpoint, out / "compvis.safetensors")

        g = torch.Generator().manual_seed(1)
        images = torch.rand(2, kwargs.get("in_channels", 3), size, size, generator=g) * 2 - 1
        f = 2 ** (n - 1)
        latents = torch.randn(
            2, kwargs.get("latent_channels", 4), size // f, size // f, generator=g
        )
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(latents).sample

        def nhwc(t):
            return t.numpy().transpose(0, 2, 3, 1)

        np.savez(
            out / "io.npz",
            images=nhwc(images),
            latents=nhwc(latents),
            mean=nhwc(posterior.mean),
            std=nhwc(posterior.std),
            decoded=nhwc(decoded),
        )
        meta["models"][name] = {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "image_size": size,
            "parameters": sum(p.numel() for p in vae.parameters()),
        }
        print(f"made {name}: {meta['models'][name]['parameters']:,} parameters")
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def check_export(folder: pathlib.Path) -> None:
    """Decodes with diffusers from our save_pretrained's folders; writes export.json."""
    import diffusers
    import torch

    errors = {}
    for name in MODELS:
        vae = diffusers.AutoencoderKL.from_pretrained(folder / name / "export").eval()
        io = np.load(folder / name / "io.npz")
        latents = torch.from_numpy(io["latents"].transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            decoded = vae.decode(latents).sample.numpy().transpose(0, 2, 3, 1)
        errors[name] = float(np.abs(decoded - io["decoded"]).max())
        print(f"{name}: diffusers decodes from our export, max |difference| {errors[name]:.3g}")
    (folder / "export.json").write_text(json.dumps(errors, indent=2) + "\n")


def compare(folder: pathlib.Path) -> list[dict]:
    import jax

    from patchdiff.models.vae import from_pretrained, save_pretrained

    meta = json.loads((folder / "meta.json").read_text())
    rows = []
    for name in MODELS:
        io = np.load(folder / name / "io.npz")
        groups = MODELS[name][0].get("norm_num_groups", 32)
        sources = [
            ("diffusers", folder / name / "model", {}),
            ("compvis", folder / name / "compvis.safetensors", {"norm_num_groups": groups}),
        ]
        for loader, path, kw in sources:
            for dtype in ("float32", "bfloat16"):
                if loader == "compvis" and dtype == "bfloat16":
                    continue  # the same parameters as the diffusers folder's row
                vae = from_pretrained(path, dtype=dtype, **kw)
                with jax.default_matmul_precision("highest"):
                    mean, std = vae.encode_moments(io["images"])
                    decoded = vae.decode(io["latents"])
                if loader == "diffusers" and dtype == "float32":
                    save_pretrained(vae, folder / name / "export")
                for quantity, ours in (("mean", mean), ("std", std), ("decoded", decoded)):
                    ref = io[quantity]
                    err = float(np.abs(np.asarray(ours) - ref).max())
                    rows.append(
                        {
                            "model": name,
                            "parameters": meta["models"][name]["parameters"],
                            "loader": loader,
                            "dtype": dtype,
                            "output": quantity,
                            "max_abs": err,
                            "max_rel": err / float(np.abs(ref).max()),
                        }
                    )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="a Python with torch and diffusers: runs all halves")
    parser.add_argument("--make", type=pathlib.Path, metavar="DIR", help="(torch) write models")
    parser.add_argument("--compare", type=pathlib.Path, metavar="DIR", help="(ours) compare")
    parser.add_argument("--check-export", type=pathlib.Path, metavar="DIR", help="(torch)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.make:
        args.make.mkdir(parents=True, exist_ok=True)
        return make(args.make)
    if args.check_export:
        return check_export(args.check_export)
    if not (args.compare or args.peer_python):
        parser.error("one of --peer-python, --make, --compare, --check-export is needed")

    import tempfile

    from benchmarks.common import environment, write_json
    from patchdiff.tables import format_table

    def peer(flag, folder):
        done = subprocess.run(
            [args.peer_python, "-m", "benchmarks.vae_diffusers", flag, str(folder)]
        )
        if done.returncode:
            sys.exit(f"vae_diffusers: {args.peer_python} {flag} failed.")

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.compare or pathlib.Path(scratch)
        if not args.compare:
            peer("--make", folder)
        rows = compare(folder)
        if args.peer_python:
            peer("--check-export", folder)
        meta = json.loads((folder / "meta.json").read_text())
        export = folder / "export.json"
        export = json.loads(export.read_text()) if export.exists() else None
    print(format_table(rows))
    payload = {
        "environment": environment(),
        "torch": meta["torch"],
        "diffusers": meta["diffusers"],
        "models": meta["models"],
        "rows": rows,
        # max |diffusers' decoding from our exported folder - from its own|; None if not run
        "export_roundtrip_max_abs": export,
    }
    print(f"wrote {write_json('vae_diffusers', payload, args.out)}")


if __name__ == "__main__":
    main()
