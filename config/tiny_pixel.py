# Pixel diffusion of the emoji set at 32 px (3×32×32), in the demo's time budget: the method
# without a codec, and the quickest runs.
#   python train.py config/tiny_pixel.py
#   python sample.py --out_dir=out-tiny-pixel --prompt "a red apple" --cfg 7
include('tiny.py')  # the demo's settings, then what differs
out_dir = 'out-tiny-pixel'
data_dir = 'data/prepared/emoji32'  # made on first use (prepare.py --image_size=32 --vae=none)
patch_size = 4  # 8×8 = 64 tokens, as the demo's
embed_dim = 64  # narrow and fast: at 32 px, steps beat width (docs/fidelity.md)
beta_a = 1.0  # σ ~ Beta(1, 1), uniform: at 32 px, shapes form at high noise anyway
