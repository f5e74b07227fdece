# The reference's model size on GPUs: 4×32×32 latents of 256 px images from
# stabilityai/sd-vae-ft-ema, CLIP ViT-L/14 text embeddings, a global batch of 256, lr 3e-4 after
# 1000 warmup steps. Make the data first, e.g.
#   python prepare.py --source=wds --input='shards/{00000..00099}.tar' --image_size=256 \
#       --vae=stabilityai/sd-vae-ft-ema --text_encoder=clip:ViT-L/14 --out_dir=data/prepared/base
#   torchrun --standalone --nproc_per_node=2 train.py config/base.py
out_dir = 'out-base'
data_dir = 'data/prepared/base'
eval_interval = 2000
ckpt_interval = 2000
log_interval = 50
# 64 × 4 = 256 images a step however many GPUs: 4 micro-steps of 64 on 1 GPU, 2 each on 2, 1 each on
# 4; on 8 GPUs one micro-step of 32 each, on 16 one of 16 (train.py splits the micro-batch)
batch_size = 64
gradient_accumulation_steps = 4
# 12 layers, 768 wide, patch 2 (16×16 = 256 tokens), heads of 64, MLP ×4: the reference's size
patch_size = 2
embed_dim = 768
n_layers = 12
mlp_multiplier = 4
head_dim = 64
# adaLN-Zero + a text prior, which measured best on the emoji set (README); the reference's own
# block, for its published figures: --conditioning=cross --text_prior=0
conditioning = 'adaln'
text_prior = 16
learning_rate = 3e-4
warmup_iters = 1000
max_iters = 260_000  # the reference's run: about 32 hours on one A100
min_lr = 3e-5
ema_decay = 0.9999  # an average over ~10k steps: a long run can afford it
eval_samples = 1024
sample_cfg = 7.0
sample_steps = 15
dtype = 'auto'  # bf16 from compute capability 8 (A100, H100), fp16 + GradScaler on older GPUs
compile = True
