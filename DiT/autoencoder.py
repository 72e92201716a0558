"""
A Jittor AutoencoderKL that loads diffusers-format VAE folders (e.g. stabilityai/sd-vae-ft-ema / sd-vae-ft-mse).

DiT trains and samples in the latent space of Stable Diffusion's KL-f8 autoencoder. The reference loads it with
``diffusers.models.AutoencoderKL.from_pretrained``; this module rebuilds the same network (same state-dict names, same
numerics) so the folder downloaded from the Hugging Face hub (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or ``.bin``) loads without torch or diffusers.
"""

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before Jittor is imported)
import jittor as jt
from jittor import nn

from guided_diffusion import nn as gd_nn
from guided_diffusion.checkpoint import load_file
from guided_diffusion.state_dicts import load_state_dict_strict
from guided_diffusion.errors import CheckpointError, UserError

from models import scaled_dot_product_attention

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def GroupNorm(num_groups: int, num_channels: int, eps: float = 1e-6) -> nn.Module:
    """The VAE's affine GroupNorm (eps 1e-6), two-pass like torch: the project's GroupNorm32 with this eps."""
    if num_channels % num_groups:
        raise UserError("GroupNorm: %d channels cannot be split into %d groups; fix norm_num_groups / "
                        "block_out_channels in the VAE config" % (num_channels, num_groups))
    return gd_nn.GroupNorm32(num_groups, num_channels, eps=eps)


def _silu(x: jt.Var) -> jt.Var:
    return x * jt.sigmoid(x)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block (GroupNorm-SiLU-conv twice) with a 1x1 conv shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-6):
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = gd_nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = gd_nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.conv_shortcut = gd_nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def execute(self, x: jt.Var) -> jt.Var:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with GroupNorm and a residual (diffusers Attention in the VAE mid-block)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.scale = channels ** -0.5

    def execute(self, x: jt.Var) -> jt.Var:
        b, c, h, w = x.shape
        hs = self.group_norm(x).reshape(b, c, h * w).permute(0, 2, 1)  # (B, HW, C)
        q, k, v = self.to_q(hs), self.to_k(hs), self.to_v(hs)
        out = self.to_out[0](scaled_dot_product_attention(q, k, v, self.scale))
        return out.permute(0, 2, 1).reshape(b, c, h, w) + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one zero column on the right and one zero row at the bottom."""

    def __init__(self, channels: int):
        self.conv = gd_nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.conv(nn.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        self.conv = gd_nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def execute(self, x: jt.Var) -> jt.Var:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h, 1, w, 1).broadcast((n, c, h, 2, w, 2)).reshape(n, c, 2 * h, 2 * w)
        return self.conv(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then an optional downsampler (diffusers DownEncoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool,
                 groups: int, eps: float = 1e-6):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps) for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def execute(self, x: jt.Var) -> jt.Var:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then an optional upsampler (diffusers UpDecoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool,
                 groups: int, eps: float = 1e-6):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps) for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def execute(self, x: jt.Var) -> jt.Var:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6, add_attention: bool = True):
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups, eps)]) if add_attention else None

    def execute(self, x: jt.Var) -> jt.Var:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image -> 2*latent_channels moments (mean, logvar) at 1/2^(len(blocks)-1) resolution."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 norm_num_groups: int, double_z: bool = True, mid_block_add_attention: bool = True):
        self.conv_in = gd_nn.Conv2d(in_channels, block_out_channels[0], 3, stride=1, padding=1)
        blocks = []
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, not last, norm_num_groups))
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(prev, norm_num_groups, add_attention=mid_block_add_attention)
        self.conv_norm_out = GroupNorm(norm_num_groups, prev, eps=1e-6)
        self.conv_out = gd_nn.Conv2d(prev, 2 * out_channels if double_z else out_channels, 3, padding=1)

    def execute(self, x: jt.Var) -> jt.Var:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(_silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image, mirroring the Encoder with layers_per_block + 1 resnets per block."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 norm_num_groups: int, mid_block_add_attention: bool = True):
        rev = list(reversed(block_out_channels))
        self.conv_in = gd_nn.Conv2d(in_channels, rev[0], 3, stride=1, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], norm_num_groups, add_attention=mid_block_add_attention)
        blocks = []
        prev = rev[0]
        for i, ch in enumerate(rev):
            last = i == len(rev) - 1
            blocks.append(UpDecoderBlock2D(prev, ch, layers_per_block + 1, not last, norm_num_groups))
            prev = ch
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = GroupNorm(norm_num_groups, prev, eps=1e-6)
        self.conv_out = gd_nn.Conv2d(prev, out_channels, 3, padding=1)

    def execute(self, z: jt.Var) -> jt.Var:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------------
# Posterior and outputs
# ----------------------------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)) over latents; logvar is clamped to [-30, 20]."""

    def __init__(self, parameters: jt.Var, deterministic: bool = False):
        self.parameters = parameters
        c = parameters.shape[1] // 2
        self.mean = parameters[:, :c]
        self.logvar = jt.clamp(parameters[:, c:], -30.0, 20.0)
        self.deterministic = deterministic
        self.std = jt.exp(0.5 * self.logvar)
        self.var = jt.exp(self.logvar)
        if deterministic:
            self.var = self.std = jt.zeros_like(self.mean)

    def sample(self, generator: Any = None) -> jt.Var:
        """mean + std * N(0, 1) noise from Jittor's global RNG (``generator`` is accepted and ignored)."""
        return self.mean + self.std * jt.randn(self.mean.shape, dtype=self.mean.dtype)

    def mode(self) -> jt.Var:
        """The posterior mean."""
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> jt.Var:
        """KL divergence to N(0, I) (or to ``other``), summed over C, H, W."""
        if self.deterministic:
            return jt.zeros((self.mean.shape[0],))
        if other is None:
            return 0.5 * (self.mean.sqr() + self.var - 1.0 - self.logvar).sum(dims=(1, 2, 3))
        return 0.5 * ((self.mean - other.mean).sqr() / other.var + self.var / other.var - 1.0
                      - self.logvar + other.logvar).sum(dims=(1, 2, 3))

    def nll(self, sample: jt.Var, dims: Sequence[int] = (1, 2, 3)) -> jt.Var:
        """Negative log-likelihood of ``sample`` under the posterior, summed over ``dims``."""
        if self.deterministic:
            return jt.zeros((self.mean.shape[0],))
        logtwopi = float(np.log(2.0 * np.pi))
        return 0.5 * (logtwopi + self.logvar + (sample - self.mean).sqr() / self.var).sum(dims=tuple(dims))


class AutoencoderKLOutput:
    """Result of :meth:`AutoencoderKL.encode`: ``latent_dist`` is the posterior."""

    def __init__(self, latent_dist: DiagonalGaussianDistribution):
        self.latent_dist = latent_dist


class DecoderOutput:
    """Result of :meth:`AutoencoderKL.decode`: ``sample`` is the decoded image batch."""

    def __init__(self, sample: jt.Var):
        self.sample = sample


# ----------------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------------

_DEFAULT_CONFIG: Dict[str, Any] = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True,
)

# Legacy (diffusers <= 0.x AttentionBlock) names of the mid-block attention layers -> current names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def convert_legacy_vae_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename legacy attention keys (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0; 1x1-conv weights -> 2-D."""
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        m = _LEGACY_RE.match(key)
        if m:
            key = m.group(1) + _LEGACY_ATTENTION_NAMES[m.group(2)] + "." + m.group(3)
            value = np.asarray(value)
            if m.group(3) == "weight" and value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


class AutoencoderKL(nn.Module):
    """KL-regularised VAE with diffusers' module names: ``encode(x).latent_dist`` and ``decode(z).sample``."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        block_out_channels = list(block_out_channels)
        bad = [t for t in down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in up_block_types if t != "UpDecoderBlock2D"]
        if bad or act_fn != "silu":
            raise UserError("unsupported VAE config (block types %s, act_fn %r): only DownEncoderBlock2D / "
                            "UpDecoderBlock2D with silu (the KL-f8 VAEs such as stabilityai/sd-vae-ft-ema) are "
                            "supported" % (sorted(set(bad)), act_fn))
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise UserError("VAE config: down_block_types, up_block_types and block_out_channels must have the "
                            "same length")
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, down_block_types=list(down_block_types),
            up_block_types=list(up_block_types), block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups,
                               double_z=True, mid_block_add_attention=mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = gd_nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = gd_nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AutoencoderKL":
        """Build a randomly initialised VAE from a diffusers config dict (unknown fields are ignored)."""
        kwargs = dict(_DEFAULT_CONFIG)
        kwargs.update({k: v for k, v in config.items() if k in _DEFAULT_CONFIG and v is not None})
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str) -> "AutoencoderKL":
        """Load a local diffusers VAE folder: config.json + diffusion_pytorch_model.safetensors (or .bin)."""
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise CheckpointError(
                "no VAE found at %r (missing %s). Download the folder from the Hugging Face hub (e.g. "
                "https://huggingface.co/stabilityai/sd-vae-ft-ema: config.json and "
                "diffusion_pytorch_model.safetensors) and place it there, or point --vae-path at it"
                % (folder, CONFIG_NAME))
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError("cannot read the VAE config %s (%s); download config.json again" %
                                  (config_path, exc))
        weights = None
        for name in WEIGHTS_NAMES:
            if os.path.isfile(os.path.join(folder, name)):
                weights = os.path.join(folder, name)
                break
        if weights is None:
            raise CheckpointError("the VAE folder %r has no weights: place %s (or %s) from the hub repository "
                                  "next to config.json" % (folder, WEIGHTS_NAMES[0], WEIGHTS_NAMES[1]))
        model = cls.from_config(config)
        state_dict = load_vae_weights(weights)
        load_state_dict_strict(model, convert_legacy_vae_keys(state_dict), source="VAE weights %s" % weights)
        model.eval()
        return model

    # -- inference --------------------------------------------------------------------------------------------------

    def encode(self, x: jt.Var, return_dict: bool = True):
        """Image batch in [-1, 1] -> AutoencoderKLOutput(latent_dist=posterior)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: jt.Var, return_dict: bool = True):
        """Latents -> DecoderOutput(sample=image batch)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        dec = self.decoder(z)
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    def execute(self, sample: jt.Var, sample_posterior: bool = False, return_dict: bool = True):
        """Encode then decode (the posterior mode, or a sample of it)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


def load_vae_weights(path: str) -> Dict[str, np.ndarray]:
    """Read a diffusers weight file (.safetensors through safetensors.numpy, .bin through checkpoint.load_file)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file as load_safetensors
            return dict(load_safetensors(path))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError("cannot read %s (%s): the file is incomplete or corrupt; download it again"
                                  % (path, exc))
        except Exception as exc:  # safetensors raises its own SafetensorError type
            if type(exc).__name__ == "SafetensorError":
                raise CheckpointError("cannot read %s (%s): the file is incomplete or corrupt; download it again"
                                      % (path, exc))
            raise
    state = load_file(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError("%s does not hold a VAE state dict" % path)
    return dict(state)
