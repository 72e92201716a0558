"""Model configurations the benchmarks use (the released ADM flags and the issue's small ADM-64)."""

from guided_diffusion.script_util import model_and_diffusion_defaults

# The released 64x64 ImageNet model (README flags of guided-diffusion).
ADM64 = dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1, image_size=64,
             learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3,
             resblock_updown=True, use_new_attention_order=True, use_fp16=False, use_scale_shift_norm=True)
# The released 256x256 conditional ImageNet model.
ADM256 = dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=256, learn_sigma=True,
              noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
              use_fp16=False, use_scale_shift_norm=True)
# The small 64x64 ADM of the performance issue (64 channels, 2 res blocks, attention at 16 and 8).
SMALL64 = dict(image_size=64, num_channels=64, num_res_blocks=2, attention_resolutions="16,8", learn_sigma=True)

CONFIGS = {"adm64": ADM64, "adm256": ADM256, "small64": SMALL64}


def flags(name: str, **overrides) -> dict:
    """Full create_model_and_diffusion kwargs for a named configuration."""
    out = model_and_diffusion_defaults()
    out.update(CONFIGS[name])
    out.update(overrides)
    return out
