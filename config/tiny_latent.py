# Latent diffusion on 2 cores: the emoji set at 128 px in TAEF2's latent space (32×16×16, the tiny
# autoencoder of FLUX.2's latents), the demo's denoiser on the 16×16 grid at patch 2: 64 tokens,
# as in pixel space. The codec's two files and the font are downloads (README, Latent demo):
#   python data/emoji/build.py --image_size=128 \
#       --font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
#   python prepare.py --source=emoji --image_size=128 --vae=taef2 \
#       --out_dir=data/prepared/emoji128-taef2
#   python train.py config/tiny_latent.py
#   python sample.py --out_dir=out-tiny-latent --prompt "a red apple"
exec(open('config/tiny.py').read())  # the demo's denoiser and time budget, then what differs
out_dir = 'out-tiny-latent'
data_dir = 'data/prepared/emoji128-taef2'
patch_size = 2  # 16×16 latents -> 8×8 tokens
embed_dim = 128  # as measured against the pixel demo (docs/latent.md); 64 is untried here
