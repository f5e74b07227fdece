# Outpainting and inpainting, fine-tuned from the emoji demo (config/tiny.py -> out-tiny). The
# input is widened by the masked latents and the mask (33 channels, zero-initialised, so step 0 is
# the old model), and each step trains on random masks (diffusion.random_masks) on the 16×16
# latent grid, with the loss on the region to generate only.
#   python train.py config/tiny_outpaint.py
#   python sample.py --out_dir=out-tiny-outpaint --prompt "a red apple" --outpaint right
out_dir = 'out-tiny-outpaint'
data_dir = 'data/prepared/emoji128-taef2'
init_from = 'out-tiny'
outpaint = True
eval_interval = 100
ckpt_interval = 200
log_interval = 50
batch_size = 64
gradient_accumulation_steps = 1
learning_rate = 5e-4
warmup_iters = 20
max_iters = 400
min_lr = 5e-5
ema_decay = 0.999
beta_b = 1.0  # as in config/tiny.py
eval_samples = 256
sample_cfg = 4.0
sample_steps = 20
