"""
The ADM U-Net, its super-resolution variant and the encoder (classifier) half, ported to Jittor.

Names, constructor signatures, defaults and state-dict keys follow openai/guided-diffusion's unet.py, so the
released PyTorch checkpoints load as they are. Differences that come from Jittor:

* ``use_fp16``: float16 is used only with CUDA (``jt.flags.use_cuda``); on the CPU (where Jittor's float16 is
  unusably slow) the model runs in float32 and says so once.
* ``use_checkpoint``: gradient checkpointing is implemented (nn.checkpoint recomputes the block in the backward
  pass); as in the reference, AttentionBlocks are always checkpointed.
* Parameter inits: the zero-initialised layers are zeroed as in the reference; the other layers use Jittor's
  initialisers, which draw from the same distributions as PyTorch's (U(+-1/sqrt(fan_in)) for conv and linear
  weights and biases, N(0, 1) for the label embedding, 1/0 for the norms), though not the same random numbers.
"""

import sys
from abc import abstractmethod
from typing import Optional, Sequence

import jittor as jt
from jittor import nn

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    qkv_attention,
    scale_shift,
    timestep_embedding,
    zero_module,
)

_FP16_NOTICE_SHOWN = False


def _fp16_available() -> bool:
    """float16 models only run on CUDA in this port."""
    return bool(jt.flags.use_cuda)


def _fp16_cpu_notice() -> None:
    global _FP16_NOTICE_SHOWN
    if not _FP16_NOTICE_SHOWN:
        _FP16_NOTICE_SHOWN = True
        print(
            "guided_diffusion: use_fp16 requested but no CUDA device is in use; the model runs in float32 on the CPU.",
            file=sys.stderr,
        )


def _upsample_nearest2x(x: jt.Var, dims: int) -> jt.Var:
    """Nearest-neighbour x2 upsampling of the spatial axes (only H and W for dims 3), as F.interpolate(nearest)."""
    shape = list(x.shape)
    if dims == 3:
        n, c, d, hh, ww = shape
        y = x.reshape((n, c, d, hh, 1, ww, 1)).broadcast((n, c, d, hh, 2, ww, 2))
        return y.reshape((n, c, d, hh * 2, ww * 2))
    lead = shape[:2]
    spatial = shape[2:]
    expanded = []
    target = []
    for s in spatial:
        expanded += [s, 1]
        target += [s, 2]
    y = x.reshape(tuple(lead + expanded)).broadcast(tuple(lead + target))
    return y.reshape(tuple(lead + [s * 2 for s in spatial]))


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling head of the classifier (mean token + positional embedding + attention)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int = None):
        super().__init__()
        self.positional_embedding = jt.randn((embed_dim, spacial_dim ** 2 + 1), dtype="float32") / embed_dim ** 0.5
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def execute(self, x: jt.Var) -> jt.Var:
        b, c = x.shape[0], x.shape[1]
        x = x.reshape((b, c, -1))  # NC(HW)
        x = jt.concat([x.mean(dim=-1, keepdims=True), x], dim=-1)  # NC(HW+1)
        x = x + self.positional_embedding.unsqueeze(0).cast(x.dtype)
        x = self.qkv_proj(x)
        x = self.attention(x)
        x = self.c_proj(x)
        return x[:, :, 0]


class TimestepBlock(nn.Module):
    """Any module whose execute() takes timestep embeddings as a second argument."""

    @abstractmethod
    def execute(self, x, emb):
        """Apply the module to `x` given `emb` timestep embeddings."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential module that passes timestep embeddings to the children that support it as an extra input."""

    def execute(self, x: jt.Var, emb: jt.Var) -> jt.Var:
        for layer in self.layers.values():
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """An upsampling layer with an optional convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: determines if the signal is 1D, 2D, or 3D. If 3D, then upsampling occurs in the inner-two dimensions.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def execute(self, x: jt.Var) -> jt.Var:
        assert x.shape[1] == self.channels
        x = _upsample_nearest2x(x, self.dims)
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """A downsampling layer with an optional convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: determines if the signal is 1D, 2D, or 3D. If 3D, then downsampling occurs in the inner-two
                 dimensions.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def execute(self, x: jt.Var) -> jt.Var:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block that can optionally change the number of channels.

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the rate of dropout.
    :param out_channels: if specified, the number of out channels.
    :param use_conv: if True and out_channels is specified, use a spatial convolution instead of a smaller 1x1
        convolution to change the channels in the skip connection.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param use_checkpoint: if True, use gradient checkpointing on this module.
    :param up: if True, use this block for upsampling.
    :param down: if True, use this block for downsampling.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down

        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            # torch modules start in training mode; Jittor's Dropout would start in eval mode.
            nn.Dropout(p=dropout, is_train=True),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def execute(self, x: jt.Var, emb: jt.Var) -> jt.Var:
        """Apply the block to a Var, conditioned on a timestep embedding ([N x C x ...], [N x emb_channels])."""
        return checkpoint(self._forward, (x, emb), _lazy_parameters(self), self.use_checkpoint)

    def _forward(self, x: jt.Var, emb: jt.Var) -> jt.Var:
        if self.updown:
            in_layers = list(self.in_layers.layers.values())
            h = x
            for layer in in_layers[:-1]:
                h = layer(h)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).cast(h.dtype)
        emb_out = emb_out.reshape(tuple(emb_out.shape) + (1,) * (h.ndim - emb_out.ndim))
        out_layers = list(self.out_layers.layers.values())
        if self.use_scale_shift_norm:
            out_norm, out_rest = out_layers[0], out_layers[1:]
            c = self.out_channels
            scale, shift = emb_out[:, :c], emb_out[:, c:]
            h = scale_shift(out_norm(h), scale, shift)
            for layer in out_rest:
                h = layer(h)
        else:
            h = h + emb_out
            for layer in out_layers:
                h = layer(h)
        return self.skip_connection(x) + h


def _lazy_parameters(module: nn.Module):
    """Parameters for checkpoint(), gathered only if checkpoint() asks for them."""
    for p in module.parameters():
        yield p


class AttentionBlock(nn.Module):
    """An attention block that allows spatial positions to attend to each other.

    Originally ported from here, but adapted to the N-d case.
    https://github.com/hojonathanho/diffusion/blob/1e0dceb3b3495bbe19116a5e1b3596cd0706c543/diffusion_tf/models/unet.py#L66.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert (
                channels % num_head_channels == 0
            ), f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}"
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            # split qkv before split heads
            self.attention = QKVAttention(self.num_heads)
        else:
            # split heads before split qkv
            self.attention = QKVAttentionLegacy(self.num_heads)

        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def execute(self, x: jt.Var) -> jt.Var:
        # The reference always checkpoints here (flag True); it only changes memory use.
        return checkpoint(self._forward, (x,), _lazy_parameters(self), True)

    def _forward(self, x: jt.Var) -> jt.Var:
        shape = tuple(x.shape)
        b, c = shape[0], shape[1]
        x = x.reshape((b, c, -1))
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv)
        h = self.proj_out(h)
        return (x + h).reshape(shape)


class QKVAttentionLegacy(nn.Module):
    """A module which performs QKV attention. Matches legacy QKVAttention + input/output heads shaping
    (per head [q | k | v] channel layout)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def execute(self, qkv: jt.Var) -> jt.Var:
        """Apply QKV attention: [N x (H * 3 * C) x T] -> [N x (H * C) x T]."""
        return qkv_attention(qkv, self.n_heads, legacy=True)


class QKVAttention(nn.Module):
    """A module which performs QKV attention and splits in a different order ([q all heads | k | v])."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def execute(self, qkv: jt.Var) -> jt.Var:
        """Apply QKV attention: [N x (3 * H * C) x T] -> [N x (H * C) x T]."""
        return qkv_attention(qkv, self.n_heads, legacy=False)


def _build_encoder(
    model: nn.Module,
    *,
    in_channels: int,
    model_channels: int,
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    dropout: float,
    channel_mult: Sequence[float],
    conv_resample: bool,
    dims: int,
    use_checkpoint: bool,
    num_heads: int,
    num_head_channels: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
    time_embed_dim: int,
):
    """Give `model` the input blocks and middle block that UNetModel and EncoderUNetModel share.

    Sets ``model.input_blocks``, ``model.middle_block`` and ``model._feature_size`` (the channels of every input
    block output plus the middle block's) and returns (input_block_chans, ch, ds, input_ch) for what follows.
    """
    ch = input_ch = int(channel_mult[0] * model_channels)
    model.input_blocks = nn.Sequential(
        TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))
    )
    model._feature_size = ch
    input_block_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [
                ResBlock(
                    ch,
                    time_embed_dim,
                    dropout,
                    out_channels=int(mult * model_channels),
                    dims=dims,
                    use_checkpoint=use_checkpoint,
                    use_scale_shift_norm=use_scale_shift_norm,
                )
            ]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(
                    AttentionBlock(
                        ch,
                        use_checkpoint=use_checkpoint,
                        num_heads=num_heads,
                        num_head_channels=num_head_channels,
                        use_new_attention_order=use_new_attention_order,
                    )
                )
            model.input_blocks.append(TimestepEmbedSequential(*layers))
            model._feature_size += ch
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            out_ch = ch
            model.input_blocks.append(
                TimestepEmbedSequential(
                    ResBlock(
                        ch,
                        time_embed_dim,
                        dropout,
                        out_channels=out_ch,
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                        down=True,
                    )
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                )
            )
            ch = out_ch
            input_block_chans.append(ch)
            ds *= 2
            model._feature_size += ch

    model.middle_block = TimestepEmbedSequential(
        ResBlock(
            ch,
            time_embed_dim,
            dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
        ),
        AttentionBlock(
            ch,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
        ),
        ResBlock(
            ch,
            time_embed_dim,
            dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
        ),
    )
    model._feature_size += ch
    return input_block_chans, ch, ds, input_ch


class UNetModel(nn.Module):
    """The full UNet model with attention and timestep embedding.

    :param in_channels: channels in the input Var.
    :param model_channels: base channel count for the model.
    :param out_channels: channels in the output Var.
    :param num_res_blocks: number of residual blocks per downsample.
    :param attention_resolutions: a collection of downsample rates at which attention will take place. May be a set,
        list, or tuple. For example, if this contains 4, then at 4x downsampling, attention will be used.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: if True, use learned convolutions for upsampling and downsampling.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param num_classes: if specified (as an int), then this model will be class-conditional with `num_classes`
        classes.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage (recompute activations in backward).
    :param use_fp16: run the convolution blocks in float16 (CUDA only; on the CPU the model stays float32).
    :param num_heads: the number of attention heads in each attention layer.
    :param num_head_channels: if specified, ignore num_heads and instead use a fixed channel width per attention head.
    :param num_heads_upsample: works with num_heads to set a different number of heads for upsampling. Deprecated.
    :param use_scale_shift_norm: use a FiLM-like conditioning mechanism.
    :param resblock_updown: use residual blocks for up/downsampling.
    :param use_new_attention_order: use a different attention pattern for potentially increased efficiency.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        if use_fp16 and not _fp16_available():
            _fp16_cpu_notice()
        self.dtype = "float16" if (use_fp16 and _fp16_available()) else "float32"
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        input_block_chans, ch, ds, input_ch = _build_encoder(
            self, in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
            time_embed_dim=time_embed_dim,
        )

        self.output_blocks = nn.Sequential()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [
                    ResBlock(
                        ch + ich,
                        time_embed_dim,
                        dropout,
                        out_channels=int(model_channels * mult),
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            use_checkpoint=use_checkpoint,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                        )
                    )
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        ResBlock(
                            ch,
                            time_embed_dim,
                            dropout,
                            out_channels=out_ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            up=True,
                        )
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self) -> None:
        """Convert the torso of the model to float16 (CUDA only; on the CPU the model stays float32)."""
        if not _fp16_available():
            _fp16_cpu_notice()
            return
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in blocks.modules():
                convert_module_to_f16(m)

    def convert_to_fp32(self) -> None:
        """Convert the torso of the model to float32."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in blocks.modules():
                convert_module_to_f32(m)

    def execute(self, x: jt.Var, timesteps: jt.Var, y: Optional[jt.Var] = None) -> jt.Var:
        """Apply the model to an input batch.

        :param x: an [N x C x ...] Var of inputs.
        :param timesteps: a 1-D Var of timesteps (int Var; keep it a Var so repeated calls reuse kernels).
        :param y: an [N] Var of labels, if class-conditional.
        :return: an [N x C x ...] Var of outputs.
        """
        assert (y is not None) == (
            self.num_classes is not None
        ), "must specify y if and only if the model is class-conditional"

        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        if self.num_classes is not None:
            assert tuple(y.shape) == (x.shape[0],)
            emb = emb + self.label_emb(y)

        h = x.cast(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = jt.concat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.cast(x.dtype)
        return self.out(h)

    forward = execute


class SuperResModel(UNetModel):
    """A UNetModel that performs super-resolution.

    Expects an extra kwarg `low_res` to condition on a low-resolution image (upsampled bilinearly inside).
    """

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def execute(self, x: jt.Var, timesteps: jt.Var, low_res: jt.Var = None, **kwargs) -> jt.Var:
        """Upsample low_res to x's size (bilinear, align_corners False), concatenate on channels, run the UNet."""
        _, _, new_height, new_width = x.shape
        upsampled = nn.interpolate(low_res, size=(new_height, new_width), mode="bilinear", align_corners=False)
        x = jt.concat([x, upsampled.cast(x.dtype)], dim=1)
        return super().execute(x, timesteps, **kwargs)

    forward = execute


class EncoderUNetModel(nn.Module):
    """The half UNet model with attention and timestep embedding (the noisy-image classifier).

    For usage, see UNetModel. ``pool`` is one of "adaptive", "attention", "spatial", "spatial_v2".
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        if use_fp16 and not _fp16_available():
            _fp16_cpu_notice()
        self.dtype = "float16" if (use_fp16 and _fp16_available()) else "float32"
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        _, ch, ds, _ = _build_encoder(
            self, in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
            time_embed_dim=time_embed_dim,
        )
        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            assert num_head_channels != -1
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                AttentionPool2d((image_size // ds), ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, self.out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                SiLU(),
                nn.Linear(2048, self.out_channels),
            )
        else:
            raise NotImplementedError(f"Unexpected {pool} pooling")

    def convert_to_fp16(self) -> None:
        """Convert the torso of the model to float16 (CUDA only; on the CPU the model stays float32)."""
        if not _fp16_available():
            _fp16_cpu_notice()
            return
        for blocks in (self.input_blocks, self.middle_block):
            for m in blocks.modules():
                convert_module_to_f16(m)

    def convert_to_fp32(self) -> None:
        """Convert the torso of the model to float32."""
        for blocks in (self.input_blocks, self.middle_block):
            for m in blocks.modules():
                convert_module_to_f32(m)

    def execute(self, x: jt.Var, timesteps: jt.Var) -> jt.Var:
        """Apply the model to an input batch: [N x C x ...] and a 1-D Var of timesteps -> [N x K] outputs."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        results = []
        h = x.cast(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.cast(x.dtype).mean(dims=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.cast(x.dtype).mean(dims=(2, 3)))
            h = jt.concat(results, dim=-1)
            return self.out(h)
        else:
            h = h.cast(x.dtype)
            return self.out(h)

    forward = execute
