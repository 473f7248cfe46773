"""The autoencoder's configuration and weight-file formats: diffusers' config.json, its tensor
names, and the CompVis (original Stable Diffusion) single-file names.

Every tensor the network has is listed once by `layout`, with its diffusers name, its CompVis name
and its path in our parameter tree, so that the two directions of each conversion cannot drift
apart. Files are read with safetensors' numpy API (never torch); `TensorFile` adds bfloat16, which
numpy cannot represent, by widening it to float32.

Glossary: B batch, H/W height/width, C channels, O/I a PyTorch weight's output/input channels,
k kernel size.
"""

import dataclasses
import json
import re
from typing import NamedTuple

import numpy as np
import safetensors
from safetensors import safe_open


class VAEError(ValueError):
    """A weight file or configuration that cannot make an `AutoencoderKL`."""


# What diffusers' AutoencoderKL.__init__ assumes for a key that config.json leaves out; these are
# not VAEConfig's defaults (which are SD's sizes), and a file must load as diffusers would load it.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "sample_size": 32,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The sizes of diffusers' `AutoencoderKL`; the defaults are Stable Diffusion 1.x/2.x's VAE.

    `latents_mean`/`latents_std` of a config.json (Playground's VAE) are not kept: latents move to
    the diffusion model's space by `scaling_factor` and `shift_factor` only.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        self.check("VAEConfig")

    def check(self, where: str) -> None:
        """Raises VAEError, naming `where`, unless every field makes a network."""
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VAEError(f"{where}: {name} must be a positive integer, found {value!r}.")
        channels = self.block_out_channels
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise VAEError(
                f"{where}: block_out_channels must be positive integers, found {channels!r}."
            )
        groups = self.norm_num_groups
        if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
            raise VAEError(
                f"{where}: norm_num_groups {groups!r} does not divide every one of "
                f"block_out_channels {channels}."
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict, where: str) -> "VAEConfig":
        """The config of a diffusers config.json `d` (read from `where`); unknown keys ignored."""
        if not isinstance(d, dict):
            raise VAEError(f"{where}: a config must be a JSON object, found {type(d).__name__}.")
        get = {k: d.get(k, v) for k, v in DIFFUSERS_DEFAULTS.items()}
        channels = get["block_out_channels"]
        if not isinstance(channels, list | tuple):
            raise VAEError(f"{where}: block_out_channels must be a list, found {channels!r}.")
        for field, block in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = d.get(field, [block])
            if not isinstance(types, list | tuple) or set(types) != {block}:
                raise VAEError(f"{where}: {field} must all be {block}, found {types!r}.")
            if len(types) != len(channels):
                raise VAEError(
                    f"{where}: {field} has {len(types)} entries but block_out_channels has "
                    f"{len(channels)}."
                )
        # diffusers' get_activation maps both names to nn.SiLU.
        if d.get("act_fn", "silu") not in ("silu", "swish"):
            raise VAEError(f"{where}: act_fn must be silu, found {d['act_fn']!r}.")
        for field in ("scaling_factor", "shift_factor"):
            value = get[field]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise VAEError(f"{where}: {field} must be a number, found {value!r}.")
        size = get["sample_size"]
        # diffusers allows [height, width]; its tiling code reads the first entry, as here.
        size = size[0] if isinstance(size, list | tuple) and size else size
        get["block_out_channels"] = tuple(channels)
        get["sample_size"] = size
        get["scaling_factor"] = float(get["scaling_factor"])
        get["shift_factor"] = float(get["shift_factor"] or 0.0)
        return cls.checked(where, **get)

    @classmethod
    def checked(cls, where: str, **fields) -> "VAEConfig":
        """A config whose errors name `where` (a file) rather than VAEConfig."""
        config = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(config, name, value)
        config.check(where)
        return config

    def to_diffusers(self) -> dict:
        """A config.json that diffusers' `AutoencoderKL.from_pretrained` accepts."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            # null, not 0.0, as in diffusers' own SD/SDXL VAE configs (pipelines test for None).
            "shift_factor": self.shift_factor or None,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": True,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


class Tensor(NamedTuple):
    """One parameter: its diffusers and CompVis names, our tree path and PyTorch-layout shape.

    kind: "conv" (OIHW in the file, HWIO here), "linear" ([O, I] there, [I, O] here; CompVis
    stores the attention's as 1x1 convs, [O, I, 1, 1]) or "vector" (biases, norm scales).
    """

    diffusers: str
    compvis: str
    path: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]


def layout(config: VAEConfig) -> list[Tensor]:
    """Every tensor of the network `config` describes."""
    tensors = []

    def layer(kind, d, v, path, *shape):
        """A layer's weight and bias: diffusers' prefix d, CompVis' v (None: the same), our path
        ("a/b"), kind "conv" (shape O, I, k, k), "linear" (O, I) or "norm" (C)."""
        path, v = tuple(path.split("/")), v or d
        weight = (*path, "scale" if kind == "norm" else "kernel")
        kind = "vector" if kind == "norm" else kind
        tensors.append(Tensor(f"{d}.weight", f"{v}.weight", weight, kind, shape))
        tensors.append(Tensor(f"{d}.bias", f"{v}.bias", (*path, "bias"), "vector", shape[:1]))

    def resnet(d, v, path, cin, cout):
        layer("norm", f"{d}.norm1", f"{v}.norm1", f"{path}/norm1", cin)
        layer("conv", f"{d}.conv1", f"{v}.conv1", f"{path}/conv1", cout, cin, 3, 3)
        layer("norm", f"{d}.norm2", f"{v}.norm2", f"{path}/norm2", cout)
        layer("conv", f"{d}.conv2", f"{v}.conv2", f"{path}/conv2", cout, cout, 3, 3)
        if cin != cout:
            layer(
                "conv",
                f"{d}.conv_shortcut",
                f"{v}.nin_shortcut",
                f"{path}/shortcut",
                cout,
                cin,
                1,
                1,
            )

    def mid(part, c):
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", f"{part}/mid_resnet_0", c, c)
        if config.mid_block_add_attention:
            d, v, path = (
                f"{part}.mid_block.attentions.0",
                f"{part}.mid.attn_1",
                f"{part}/mid_attention",
            )
            layer("norm", f"{d}.group_norm", f"{v}.norm", f"{path}/norm", c)
            layer("linear", f"{d}.to_q", f"{v}.q", f"{path}/q", c, c)
            layer("linear", f"{d}.to_k", f"{v}.k", f"{path}/k", c, c)
            layer("linear", f"{d}.to_v", f"{v}.v", f"{path}/v", c, c)
            layer("linear", f"{d}.to_out.0", f"{v}.proj_out", f"{path}/proj", c, c)
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", f"{part}/mid_resnet_1", c, c)

    channels, layers = config.block_out_channels, config.layers_per_block
    n, latent = len(channels), config.latent_channels
    layer("conv", "encoder.conv_in", None, "encoder/conv_in", channels[0], config.in_channels, 3, 3)
    cin = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            resnet(
                f"encoder.down_blocks.{i}.resnets.{j}",
                f"encoder.down.{i}.block.{j}",
                f"encoder/down_{i}_resnet_{j}",
                cin,
                c,
            )
            cin = c
        if i < n - 1:
            d, v = (
                f"encoder.down_blocks.{i}.downsamplers.0.conv",
                f"encoder.down.{i}.downsample.conv",
            )
            layer("conv", d, v, f"encoder/down_{i}_downsample", c, c, 3, 3)
    mid("encoder", channels[-1])
    layer("norm", "encoder.conv_norm_out", "encoder.norm_out", "encoder/norm_out", channels[-1])
    layer("conv", "encoder.conv_out", None, "encoder/conv_out", 2 * latent, channels[-1], 3, 3)
    if config.use_quant_conv:
        layer("conv", "quant_conv", None, "quant_conv", 2 * latent, 2 * latent, 1, 1)
    if config.use_post_quant_conv:
        layer("conv", "post_quant_conv", None, "post_quant_conv", latent, latent, 1, 1)

    layer("conv", "decoder.conv_in", None, "decoder/conv_in", channels[-1], latent, 3, 3)
    mid("decoder", channels[-1])
    cin = channels[-1]
    for i, c in enumerate(reversed(channels)):
        # CompVis numbers the decoder's levels by resolution, diffusers by the order they run in.
        level = n - 1 - i
        for j in range(layers + 1):
            resnet(
                f"decoder.up_blocks.{i}.resnets.{j}",
                f"decoder.up.{level}.block.{j}",
                f"decoder/up_{i}_resnet_{j}",
                cin,
                c,
            )
            cin = c
        if i < n - 1:
            d, v = f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"
            layer("conv", d, v, f"decoder/up_{i}_upsample", c, c, 3, 3)
    layer("norm", "decoder.conv_norm_out", "decoder.norm_out", "decoder/norm_out", channels[0])
    layer(
        "conv", "decoder.conv_out", None, "decoder/conv_out", config.out_channels, channels[0], 3, 3
    )
    return tensors


def _flax_shape(t: Tensor) -> tuple[int, ...]:
    if t.kind == "conv":
        o, i, kh, kw = t.shape
        return (kh, kw, i, o)
    return t.shape[::-1]


def to_state_dict(params, config: VAEConfig) -> dict[str, np.ndarray]:
    """Our parameters under diffusers' names, in PyTorch layouts (float32)."""
    out = {}
    for t in layout(config):
        node = params
        try:
            for key in t.path:
                node = node[key]
        except (KeyError, TypeError):
            raise VAEError(
                f"params: no parameter {'/'.join(t.path)}, which the config needs."
            ) from None
        value = np.asarray(node, np.float32)
        if value.shape != _flax_shape(t):
            raise VAEError(
                f"params: {'/'.join(t.path)} has shape {value.shape}, expected {_flax_shape(t)}."
            )
        if t.kind == "conv":
            value = value.transpose(3, 2, 0, 1)
        elif t.kind == "linear":
            value = value.T
        out[t.diffusers] = np.ascontiguousarray(value)
    return out


# diffusers before 0.14 named the mid-block attention's layers so (its Attention loader renames them
# too); the group norm kept its name.
_OLD_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def from_state_dict(tensors: dict[str, np.ndarray], config: VAEConfig, where: str):
    """Our parameter tree from diffusers-named PyTorch-layout `tensors` (read from `where`).

    Every tensor the config needs must be there with its shape, and no other may be.
    """
    renamed = {}
    for name, value in tensors.items():
        if ".mid_block.attentions.0." in name:
            for old, new in _OLD_ATTENTION.items():
                name = name.replace(old, new)
        renamed[name] = value
    return params_from_tensors(renamed, config, where, "diffusers")


def params_from_tensors(tensors: dict, config: VAEConfig, where: str, naming: str):
    """As `from_state_dict`, with `naming` "diffusers" or "compvis" saying which names to expect.

    `tensors` maps names to arrays or to zero-argument loaders of them, so that a large file's
    tensors are read only once their names and shapes have been checked.
    """
    expected = layout(config)
    names = {getattr(t, naming) for t in expected}
    unexpected = sorted(set(tensors) - names)
    if unexpected:
        raise VAEError(
            f"{where}: tensor {unexpected[0]!r} is not part of the VAE that the config describes "
            f"({len(unexpected)} such tensor(s))."
        )
    params = {}
    for t in expected:
        name = getattr(t, naming)
        if name not in tensors:
            raise VAEError(f"{where}: tensor {name!r} (shape {t.shape}) is missing.")
        value = tensors[name]
        value = np.asarray(value() if callable(value) else value, np.float32)
        # A 1x1 conv holds a linear layer in CompVis files: [O, I, 1, 1] is [O, I].
        if t.kind == "linear" and value.shape[:2] == t.shape and set(value.shape[2:]) <= {1}:
            value = value.reshape(t.shape)
        if value.shape != t.shape:
            raise VAEError(f"{where}: tensor {name!r} has shape {value.shape}, expected {t.shape}.")
        if t.kind == "conv":
            value = value.transpose(2, 3, 1, 0)
        elif t.kind == "linear":
            value = value.T
        node = params
        for key in t.path[:-1]:
            node = node.setdefault(key, {})
        node[t.path[-1]] = np.ascontiguousarray(value)
    return params


# ---------------------------------------------------------------------------------------------
# safetensors files


class TensorFile:
    """A safetensors file opened for reading: names, shapes (without reading data) and tensors
    as float32 numpy arrays. Every failure is a VAEError naming the file."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._file = safe_open(self.path, framework="np")
            self.names = list(self._file.keys())
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise VAEError(f"{self.path} is not a readable safetensors file ({e}).") from None

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._file.get_slice(name).get_shape())
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise VAEError(f"{self.path}: tensor {name!r} cannot be read ({e}).") from None

    def load(self, name: str) -> np.ndarray:
        try:
            if self._file.get_slice(name).get_dtype() == "BF16":
                return self._load_bfloat16(name)
            return np.asarray(self._file.get_tensor(name), np.float32)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise VAEError(f"{self.path}: tensor {name!r} cannot be read ({e}).") from None

    def _load_bfloat16(self, name: str) -> np.ndarray:
        # numpy has no bfloat16, so safetensors' numpy API refuses it; bfloat16 is the top half of
        # a float32, so the raw bits shifted up are the exact float32 value.
        with open(self.path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_size))[name]
            start, end = entry["data_offsets"]
            f.seek(8 + header_size + start)
            raw = np.frombuffer(f.read(end - start), "<u2")
        if raw.size != int(np.prod(entry["shape"])):
            raise VAEError(f"{self.path}: tensor {name!r} is cut short.")
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])

    def loaders(self, names) -> dict:
        return {name: (lambda name=name: self.load(name)) for name in names}


# ---------------------------------------------------------------------------------------------
# CompVis single files

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# A whole Stable Diffusion checkpoint holds the VAE under "first_stage_model."; some single files
# (diffusers' LDM_VAE_KEYS) under "vae.".
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")


def compvis_vae_names(file: TensorFile) -> dict[str, str]:
    """{name without prefix: name in the file} of the VAE's tensors; the file's other tensors
    (a diffusion model, a text encoder, a training loss) are left out."""
    for prefix in CHECKPOINT_PREFIXES:
        found = {n[len(prefix) :]: n for n in file.names if n.startswith(prefix)}
        found = {k: v for k, v in found.items() if k.startswith(VAE_PREFIXES)}
        if found:
            return found
    return {n: n for n in file.names if n.startswith(VAE_PREFIXES)}


def infer_compvis_config(
    shapes: dict[str, tuple[int, ...]], where: str, scaling_factor: float, norm_num_groups: int
) -> VAEConfig:
    """The VAEConfig of a CompVis-named VAE from its tensors' names and shapes (`shapes`).

    The group count is not in any shape, so it is given (Stable Diffusion's VAEs all use 32).
    """

    def shape(name):  # of a conv kernel, [O, I, k, k]
        if name not in shapes:
            raise VAEError(f"{where}: tensor {name!r} is missing.")
        if len(shapes[name]) != 4:
            raise VAEError(
                f"{where}: tensor {name!r} has shape {shapes[name]}, expected [O, I, k, k]."
            )
        return shapes[name]

    levels = {}
    for name in shapes:
        m = re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.", name)
        if m:
            levels.setdefault(int(m[1]), set()).add(int(m[2]))
    if not levels:
        raise VAEError(f"{where}: tensor 'encoder.down.0.block.0.conv1.weight' is missing.")
    n = max(levels) + 1
    channels = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n))
    attention = any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in shapes)
    if any(c % norm_num_groups for c in channels):
        raise VAEError(
            f"{where}: {norm_num_groups} groups do not divide block_out_channels {channels}; "
            "from_pretrained's norm_num_groups= names the VAE's group count."
        )
    return VAEConfig.checked(
        where,
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=channels,
        layers_per_block=len(levels[0]),
        latent_channels=shape("decoder.conv_in.weight")[1],
        norm_num_groups=norm_num_groups,
        scaling_factor=float(scaling_factor),
        shift_factor=0.0,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention=attention,
        sample_size=VAEConfig.sample_size,
    )
