"""
DiT (Scalable Diffusion Models with Transformers) in Jittor.

A faithful port of facebookresearch/DiT ``models.py``: the same classes, parameter names (so the released
``DiT-XL-2-256x256.pt`` loads key for key), initialisation and numerics. The timm building blocks DiT uses
(``PatchEmbed``, ``Attention``, ``Mlp``) are re-implemented here with timm's parameter names.
"""

import math
from typing import Optional, Tuple

import numpy as np

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before Jittor is imported)
import jittor as jt
from jittor import nn

from guided_diffusion import cpu
from guided_diffusion import nn as gd_nn
from guided_diffusion.guidance import interval_mask, rescale_noise_cfg


# ----------------------------------------------------------------------------------------------------------------
# Small numerical helpers
# ----------------------------------------------------------------------------------------------------------------


def modulate(x: jt.Var, shift: jt.Var, scale: jt.Var) -> jt.Var:
    """adaLN modulation x*(1+scale)+shift, broadcast over tokens (argument order as in the reference)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def norm_modulate(norm: "LayerNormNoAffine", x: jt.Var, shift: jt.Var, scale: jt.Var) -> jt.Var:
    """modulate(norm(x), shift, scale)."""
    if x.ndim == 3 and cpu.fast_cpu_inference_path(x, shift, scale):
        return cpu.layer_norm_modulate(x, shift, scale, norm.eps)
    return modulate(norm(x), shift, scale)


def gelu_tanh(x: jt.Var) -> jt.Var:
    """GELU with the tanh approximation (torch ``GELU(approximate="tanh")``); Jittor only has the erf form."""
    # Clamping the tanh argument to +-20 changes no float32 value (tanh is exactly +-1 there) but keeps the
    # gradient finite: Jittor 1.3.11's tanh gradient is NaN for arguments between about 45 and 1e4.
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + jt.tanh(inner.clamp(-20.0, 20.0)))


class GELUTanh(nn.Module):
    """Module form of :func:`gelu_tanh`, used as the Mlp activation."""

    def execute(self, x: jt.Var) -> jt.Var:
        return gelu_tanh(x)


class LayerNormNoAffine(nn.Module):
    """LayerNorm over the last dim without affine parameters, computed two-pass (mean first) for accuracy.

    Jittor's LayerNorm computes the variance as E[x^2]-E[x]^2, which loses precision for activations with a large
    mean; DiT's residual stream can have one, so the mean is subtracted before squaring.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6):
        self.normalized_shape = normalized_shape
        self.eps = eps

    def execute(self, x: jt.Var) -> jt.Var:
        xc = x - x.mean(-1, keepdims=True)
        var = (xc * xc).mean(-1, keepdims=True)
        return xc / jt.sqrt(var + self.eps)


def _xavier_uniform_matrix(var: jt.Var) -> None:
    """xavier_uniform on ``var`` viewed as a matrix (out, rest): torch's fan rule for DiT's Linear/patch weights."""
    fan_out = var.shape[0]
    fan_in = int(np.prod(var.shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    var.assign(jt.init.uniform(var.shape, "float32", -bound, bound))


# ----------------------------------------------------------------------------------------------------------------
# timm-equivalent layers (same parameter names)
# ----------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch tokens: a stride-p conv, flattened row-major to (N, T, D) (timm PatchEmbed, no norm)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True):
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

    def execute(self, x: jt.Var) -> jt.Var:
        n, _, h, w = x.shape
        if (h, w) != self.img_size:
            raise ValueError("input size (%d, %d) does not match the model's input size %s"
                             % (h, w, self.img_size))
        x = self.proj(x)  # (N, D, h/p, w/p)
        return x.reshape(n, x.shape[1], -1).permute(0, 2, 1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear, timm layout [q_all | k_all | v_all]."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs):
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def execute(self, x: jt.Var) -> jt.Var:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, hd)
        q = q.reshape(b * self.num_heads, n, self.head_dim)
        k = k.reshape(b * self.num_heads, n, self.head_dim)
        v = v.reshape(b * self.num_heads, n, self.head_dim)
        out = scaled_dot_product_attention(q, k, v, self.scale)  # (B*heads, N, hd)
        out = out.reshape(b, self.num_heads, n, self.head_dim).permute(0, 2, 1, 3).reshape(b, n, c)
        return self.proj(out)


def scaled_dot_product_attention(q: jt.Var, k: jt.Var, v: jt.Var, scale: float) -> jt.Var:
    """softmax(q k^T * scale) v over (batch, tokens, dim) inputs."""
    if cpu.fast_cpu_path(q, k, v):
        return cpu.scaled_dot_product_attention(q, k, v, scale)
    attn = nn.softmax(nn.bmm_transpose(q, k) * scale, dim=-1)
    return nn.bmm(attn, v)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm Mlp with dropout 0 and no norm)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer=GELUTanh, drop: float = 0.0):
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------------------------------
# Embedding layers for timesteps and class labels
# ----------------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations (sinusoid then a 2-layer MLP)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    # Identical to guided-diffusion's (cos first, then sin): one implementation, imported.
    timestep_embedding = staticmethod(gd_nn.timestep_embedding)

    def execute(self, t: jt.Var) -> jt.Var:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Embeds class labels; with dropout_prob > 0 it has one extra row, the null class ``num_classes`` for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: jt.Var, force_drop_ids: Optional[jt.Var] = None) -> jt.Var:
        """Replace labels by the null class with probability dropout_prob (or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop_ids = jt.rand(labels.shape[0]) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        null = jt.full_like(labels, self.num_classes)
        return jt.ternary(drop_ids, null, labels)

    def execute(self, labels: jt.Var, train: bool, force_drop_ids: Optional[jt.Var] = None) -> jt.Var:
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------------------------
# Core DiT model
# ----------------------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """A DiT transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **block_kwargs):
        self.norm1 = LayerNormNoAffine(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **block_kwargs)
        self.norm2 = LayerNormNoAffine(hidden_size, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=GELUTanh, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def execute(self, x: jt.Var, c: jt.Var) -> jt.Var:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(norm_modulate(self.norm1, x, shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(norm_modulate(self.norm2, x, shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN-modulated norm, then a Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        self.norm_final = LayerNormNoAffine(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def execute(self, x: jt.Var, c: jt.Var) -> jt.Var:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = norm_modulate(self.norm_final, x, shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (class-conditional, latent space)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        use_checkpoint: bool = False,
    ):
        self.learn_sigma = learn_sigma
        self.use_checkpoint = use_checkpoint  # recompute each block in the backward pass (less memory)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Will use fixed sin-cos embedding; a stop-grad Var is a parameter here too (it is in the state dict).
        self.pos_embed = jt.zeros((1, num_patches, hidden_size), dtype="float32").stop_grad()

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference initialisation: xavier Linears, sin-cos pos_embed, N(0,.02) embeddings, zeroed adaLN/out."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _xavier_uniform_matrix(m.weight)
                if m.bias is not None:
                    m.bias.assign(jt.zeros(m.bias.shape, "float32"))

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.assign(jt.array(pos_embed.astype(np.float32)[None]))

        w = self.x_embedder.proj.weight
        _xavier_uniform_matrix(w)
        self.x_embedder.proj.bias.assign(jt.zeros(self.x_embedder.proj.bias.shape, "float32"))

        table = self.y_embedder.embedding_table.weight
        table.assign(jt.init.gauss(table.shape, "float32", 0.0, 0.02))
        for i in (0, 2):
            lin = self.t_embedder.mlp[i]
            lin.weight.assign(jt.init.gauss(lin.weight.shape, "float32", 0.0, 0.02))

        zero_layers = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zero_layers:
            lin.weight.assign(jt.zeros(lin.weight.shape, "float32"))
            lin.bias.assign(jt.zeros(lin.bias.shape, "float32"))

    def unpatchify(self, x: jt.Var) -> jt.Var:
        """(N, T, p*p*C) tokens -> (N, C, H, W) images; per token the layout is (p_row, p_col, channel)."""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
        return x.reshape(x.shape[0], c, h * p, w * p)

    def execute(self, x: jt.Var, t: jt.Var, y: jt.Var) -> jt.Var:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W)."""
        x = self.x_embedder(x) + self.pos_embed
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.is_training())
        c = t + y
        for block in self.blocks:
            x = gd_nn.checkpoint(block, (x, c), block.parameters(), self.use_checkpoint)
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward(self, x: jt.Var, t: jt.Var, y: jt.Var) -> jt.Var:
        """Alias of ``execute`` under the reference's name (``model.forward`` in sample_ddp)."""
        return self.execute(x, t, y)

    def forward_with_cfg(self, x: jt.Var, t: jt.Var, y: jt.Var, cfg_scale: float,
                         guide_all_channels: bool = False, guidance_interval: Optional[Tuple[int, int]] = None,
                         guidance_rescale: float = 0.0) -> jt.Var:
        """Classifier-free guidance on a doubled batch [cond | null], exactly as released.

        As in the reference, only the first half of ``x`` is used (it is duplicated), and by default guidance is
        applied to the first 3 eps channels only (the released code keeps this "for exact reproducibility"); the
        remaining eps channel and the learned-variance channels come through unguided. ``guide_all_channels=True``
        applies guidance to all ``in_channels`` eps channels instead (the standard formulation).
        ``guidance_interval=(LO, HI)`` guides only at timesteps LO <= t <= HI (elsewhere both halves get the
        conditional output, and the null half is not computed); ``guidance_rescale`` > 0 rescales the guided eps
        channels toward the conditional ones' standard deviation (diffusers' rescale_noise_cfg). Both are off by
        default.
        """
        n = x.shape[0] // 2
        half = x[:n]
        if guidance_interval is not None and not interval_mask(t[:n], guidance_interval).any():
            cond_out = self.execute(half, t[:n], y[:n])
            return jt.concat([cond_out, cond_out], dim=0)
        combined = jt.concat([half, half], dim=0)
        model_out = self.execute(combined, t, y)
        n_guided = self.in_channels if guide_all_channels else 3
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = eps[: eps.shape[0] // 2], eps[eps.shape[0] // 2:]
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if guidance_rescale:
            half_eps = rescale_noise_cfg(half_eps, cond_eps, guidance_rescale)
        if guidance_interval is not None:  # samples whose timestep lies outside keep the conditional eps
            inside = jt.array(interval_mask(t[:n], guidance_interval).astype(np.float32)).reshape(-1, 1, 1, 1)
            half_eps = inside * half_eps + (1.0 - inside) * cond_eps
        eps = jt.concat([half_eps, half_eps], dim=0)
        return jt.concat([eps, rest], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Sine/cosine positional embedding (numpy, float64, as the reference / MAE)
# ----------------------------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False,
                            extra_tokens: int = 0) -> np.ndarray:
    """(grid_size*grid_size, embed_dim) table; first half encodes the column (w), second half the row (h)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """Concatenate the 1-D embeddings of grid[0] (w) and grid[1] (h), each with embed_dim/2 dims."""
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin | cos] of pos * omega with omega_i = 1/10000^(i/(D/2)), computed in float64."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# DiT configs
# ----------------------------------------------------------------------------------------------------------------


def DiT_XL_2(**kwargs) -> DiT:
    """DiT-XL/2: depth 28, hidden 1152, 16 heads, patch 2."""
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_XL_4(**kwargs) -> DiT:
    """DiT-XL/4: depth 28, hidden 1152, 16 heads, patch 4."""
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def DiT_XL_8(**kwargs) -> DiT:
    """DiT-XL/8: depth 28, hidden 1152, 16 heads, patch 8."""
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def DiT_L_2(**kwargs) -> DiT:
    """DiT-L/2: depth 24, hidden 1024, 16 heads, patch 2."""
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def DiT_L_4(**kwargs) -> DiT:
    """DiT-L/4: depth 24, hidden 1024, 16 heads, patch 4."""
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def DiT_L_8(**kwargs) -> DiT:
    """DiT-L/8: depth 24, hidden 1024, 16 heads, patch 8."""
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    """DiT-B/2: depth 12, hidden 768, 12 heads, patch 2."""
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def DiT_B_4(**kwargs) -> DiT:
    """DiT-B/4: depth 12, hidden 768, 12 heads, patch 4."""
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def DiT_B_8(**kwargs) -> DiT:
    """DiT-B/8: depth 12, hidden 768, 12 heads, patch 8."""
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def DiT_S_2(**kwargs) -> DiT:
    """DiT-S/2: depth 12, hidden 384, 6 heads, patch 2."""
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def DiT_S_4(**kwargs) -> DiT:
    """DiT-S/4: depth 12, hidden 384, 6 heads, patch 4."""
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def DiT_S_8(**kwargs) -> DiT:
    """DiT-S/8: depth 12, hidden 384, 6 heads, patch 8."""
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
