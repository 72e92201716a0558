"""
The --help text of the ADM scripts' flags, written once, and the one function that attaches it to a parser.

script_util.add_dict_to_argparser creates flags without help; ``attach_flag_help(parser, extra)`` gives each flag
its text from ``FLAG_HELP`` (``extra`` first: a script's own wording where a flag means something else there; the
training scripts pass ``TRAINING_FLAG_HELP``) and shows its default the same way in every script:
``text (default: 0.0001)``.
"""

import argparse
from typing import Dict, Mapping, Optional

from .samplers import sampler_flag_help

#: One text per flag, for every script that has the flag (sampling, training, bits/dim).
FLAG_HELP: Dict[str, str] = {
    # the diffusion model (script_util.model_and_diffusion_defaults, sr_model_and_diffusion_defaults)
    "image_size": "image height and width in pixels (training images are resized and centre-cropped to it)",
    "num_channels": "base channel count of the UNet (released models: 192 at 64x64, 256 at 128-512)",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (used when --num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the decoder (-1: same as --num_heads)",
    "num_head_channels": "channels per attention head (-1: use --num_heads heads instead)",
    "attention_resolutions": "comma-separated feature-map sizes (in pixels) that get self-attention",
    "channel_mult": "comma-separated channel multipliers per level (empty: the default for --image_size)",
    "dropout": "dropout rate in the residual blocks (no effect when sampling)",
    "class_cond": "class-conditional model (training: labels from the class sub-folders or the file-name prefix "
                  "before '_', see --class_from; sampling: its checkpoint has label_emb.weight)",
    "num_classes": "number of classes: rows of the label table (--class_cond True) or the classifier's outputs "
                   "(1000: ImageNet, the released models); training stops at start-up when the data has more "
                   "classes; sampling draws labels from classes.json beside the checkpoint, else from 0..N-1",
    "use_checkpoint": "gradient checkpointing: recompute activations in the backward pass to save memory (no effect "
                      "when sampling)",
    "use_scale_shift_norm": "the ResBlocks condition on the timestep with scale and shift (FiLM)",
    "resblock_updown": "up/downsample with residual blocks instead of plain layers",
    "use_new_attention_order": "split q, k, v before the heads (64x64 released model: True)",
    "use_fp16": "run the model's convolutions in float16 (GPU only; on a CPU the model stays float32 with a notice)",
    "learn_sigma": "the model predicts the variance too (6 output channels)",
    "diffusion_steps": "number of steps T of the diffusion process (sampling: the number the model was trained with)",
    "noise_schedule": "beta schedule of the diffusion process: linear or cosine",
    "timestep_respacing": "sampling steps taken from --diffusion_steps: a number (e.g. 250), comma-separated "
                          "section counts, ddimN (DDIM's even stride, e.g. ddim25), logsnrN (N steps uniform in "
                          "log-SNR, for the ODE samplers dpm++2m, dpm++3m, unipc) or logsnrN@S (the same from "
                          "timestep S, e.g. logsnr10@990 for cosine-schedule models); empty: all steps",
    "use_kl": "train with the variational bound (KL) loss (no effect when sampling)",
    "predict_xstart": "the model predicts x_0 instead of the noise",
    "rescale_timesteps": "the model takes timesteps scaled to 0..1000",
    "rescale_learned_sigmas": "use the hybrid loss with the rescaled vb term (no effect when sampling)",
    "large_size": "output size of the super-resolution model (training: the training image size)",
    "small_size": "size of the low-resolution input (training: the image area-downsampled to it; sampling: the "
                  "--base_samples images)",
    # the classifier (script_util.classifier_defaults)
    "classifier_use_fp16": "run the classifier in float16 (GPU only; on a CPU it stays float32)",
    "classifier_width": "base channel count of the classifier",
    "classifier_depth": "residual blocks per level of the classifier",
    "classifier_attention_resolutions": "comma-separated feature-map sizes with attention in the classifier",
    "classifier_use_scale_shift_norm": "the classifier's ResBlocks use scale and shift (FiLM) timestep conditioning",
    "classifier_resblock_updown": "the classifier downsamples with residual blocks",
    "classifier_pool": "the classifier's output head: attention, adaptive, spatial or spatial_v2",
    # sampling
    "clip_denoised": "clamp each predicted x_0 to [-1, 1] while sampling (reference default True)",
    "num_samples": "number of images to generate in total (split across MPI ranks)",
    "batch_size": "images per batch (each MPI rank samples one batch at a time)",
    "use_ddim": "sample with DDIM (deterministic, eta 0) instead of DDPM: the same as --sampler ddim",
    "sampler": sampler_flag_help(),
    "unipc_order": "--sampler unipc: order of the predictor, 1-3 (the corrector adds one at no extra model call); "
                   "1 keeps classifier guidance best with few steps (README, Fast sampling)",
    "unipc_variant": "--sampler unipc: B(h) of the update, bh1 (B(h) = h) or bh2 (B(h) = e^h - 1, diffusers' "
                     "default)",
    "guidance_interval": "LO,HI: guide only at timesteps LO <= t <= HI of the original 0..T-1 scale (Kynkaanniemi "
                         "et al. 2024), elsewhere the conditional prediction alone; empty: guide at every step",
    "guidance_rescale": "classifier-free guidance: rescale the guided noise prediction's standard deviation toward "
                        "the conditional one by this factor (Lin et al. 2023, Eq. 15-16; diffusers' "
                        "guidance_rescale); 0: off",
    "model_path": "diffusion model checkpoint (.pt), e.g. models/256x256_diffusion.pt (scripts/download_models.py)",
    "classifier_path": "noisy-image classifier checkpoint (.pt), e.g. models/256x256_classifier.pt",
    "classifier_scale": "strength of classifier guidance: the gradient of log p(y|x_t) is multiplied by this",
    "seed": "random seed; batch i draws its labels and noise from (seed, i), so runs are reproducible, independent "
            "of the number of MPI ranks, and an interrupted run can be continued by repeating the command",
    "class_labels": "comma-separated class ids or class names of classes.json beside the checkpoint, used in "
                    "turn for the samples (e.g. 207 or 1,2,3 or cat,dog); empty: a random class per sample",
    "base_samples": ".npz of low-resolution samples (arr_0 uint8 NHWC, arr_1 labels when --class_cond True) "
                    "to upsample, e.g. the output of classifier_sample.py at 64x64",
    "w": "classifier-free guidance weight: eps = (1 + w) * eps_cond - w * eps_uncond; 0 samples the "
         "conditional model alone, larger values follow the class more closely (less diversity)",
    "cmodel_path": "mode (a): the class-conditional model, e.g. models/256x256_diffusion.pt",
    "ucmodel_path": "mode (a): the unconditional model, e.g. models/256x256_diffusion_uncond.pt",
    "data_dir": "folder of images to evaluate (searched recursively)",
    # training
    "schedule_sampler": "how training timesteps are drawn: uniform or loss-second-moment",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW decoupled weight decay (applies to every parameter)",
    "lr_anneal_steps": "train this many steps with the learning rate decaying linearly to 0 (0: forever, constant)",
    "microbatch": "split each batch into chunks of this size (gradients are summed); -1: no split",
    "ema_rate": "comma-separated EMA rates; each writes ema_<rate>_NNNNNN.pt",
    "log_interval": "dump the logged values every this many steps",
    "save_interval": "write model/ema/opt checkpoints every this many steps",
    "resume_checkpoint": "modelNNNNNN.pt to resume from (its EMA and opt files beside it are used too)",
    "random_flip": "mirror half of the training images horizontally (the reference always does; turn it off for "
                   "data such as digits, where a mirrored image is another class)",
    "fp16_scale_growth": "log2 loss-scale growth per successful fp16 step",
    "p_uncond": "probability of replacing a label by the null label during training",
    "val_data_dir": "folder of validation images (evaluated every --eval_interval steps); '' to skip",
    "noised": "train on noised inputs q_sample(x, t) with random timesteps t (for guidance)",
    "iterations": "total number of optimizer steps (resumed steps included)",
    "anneal_lr": "decay the learning rate linearly to 0 over --iterations",
    "eval_interval": "evaluate on --val_data_dir every this many steps",
}

#: What the shared flags mean in the training scripts (image_train, classifier_train, free_train, super_res_train).
TRAINING_FLAG_HELP: Dict[str, str] = {
    "data_dir": "folder of training images (searched recursively; classes: see --class_from)",
    "class_from": "where an image's class comes from: folder (its sub-folder of --data_dir, as ImageFolder), "
                  "filename (the file-name prefix before '_', the reference's rule) or auto (folder when every "
                  "image lies in one of two or more sub-folders, else filename; named at start-up when the two "
                  "differ). The run writes the class list to classes.json in its log directory",
    "batch_size": "images per step per MPI rank",
    "seed": "seed of the initial weights, data order, augmentations, noise and timesteps (the same command, seed and "
            "number of MPI ranks give the same run; a resumed run continues the same streams)",
    "use_fp16": "mixed precision with dynamic loss scaling (CUDA only; on the CPU the model stays float32)",
    "classifier_use_fp16": "mixed precision with dynamic loss scaling (CUDA only)",
    "timestep_respacing": "respacing of the diffusion steps (usually '' for training)",
    "ema_std": "post-hoc EMA: comma-separated relative standard deviations in (0, 0.28] (e.g. 0.05,0.1), one "
               "power-function EMA each (EDM2), saved as phema_<std>_<step>.pt with every checkpoint set; "
               "scripts/reconstruct_ema.py then makes the EMA of any std. Empty: off",
    "max_steps": "end the run after this many optimizer steps (counted across resumes) with a complete checkpoint "
                 "set, without changing the lr schedule; 0: no limit (with --lr_anneal_steps the earlier wins)",
    "preview_interval": "every N optimizer steps write preview_NNNNNN.png into the log dir: a grid sampled with the "
                        "first EMA from fixed noise and labels (a row per class, at most 8), UniPC on logsnr10; "
                        "super-resolution: the first images' low-resolution versions, each left of its sample. "
                        "Training is unchanged by it. 0: off",
    "finetune_from": "start from this checkpoint (released or a run's model/EMA file) at step 0 with a fresh "
                     "optimizer: tensors that fit are loaded, the label table / classifier output of another class "
                     "count is re-initialised, a table says which; other differences are refused",
}


def attach_flag_help(parser, extra: Optional[Mapping[str, str]] = None) -> None:
    """Give every flag of `parser` its help text and its default, shown as ``text (default: value)``.

    The text is the script's own (`extra`, or the help given to add_argument) or else FLAG_HELP's. The default is
    left to argparse (``%(default)r``), so it is the parsed default and no formatter shows it twice.
    """
    extra = extra or {}
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        if action.dest in extra or (not action.help and action.dest in FLAG_HELP):
            text = extra[action.dest] if action.dest in extra else FLAG_HELP[action.dest]
            text = text.replace("%", "%%")  # argparse %-formats help strings
        else:
            text = action.help or ""
        if "%(default)" not in text:
            text = text + " (default: %(default)r)" if text else "default: %(default)r"
        action.help = text
