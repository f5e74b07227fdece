# The CPU demo: latent diffusion of the emoji set at 128 px in TAEF2's latent space (32×16×16, the
# tiny autoencoder of FLUX.2's latents, shipped in weights/), MiniLM captions, in a time budget:
# train.py times its steps and fits max_iters to them, so the README command ends within 10
# minutes on 2 cores of any x86 CPU, preparing the data included.
#   python train.py config/tiny.py
#   python sample.py --prompt "a red apple" --cfg 7
out_dir = 'out-tiny'
data_dir = 'data/prepared/emoji128-taef2'  # made on first use (python prepare.py)
eval_interval = 3000
ckpt_interval = 3000
log_interval = 500
batch_size = 16  # small batches, many steps
gradient_accumulation_steps = 1
patch_size = 2  # 16×16 latents -> 8×8 = 64 tokens
embed_dim = 128
n_layers = 4
head_dim = 32  # 4 heads
mlp_multiplier = 2  # cheaper steps: at equal time its prompts beat a 4x MLP's
learning_rate = 1.5e-3
warmup_iters = 100
max_minutes = 8.5  # preparing the data and compiling included: all of it ends within 10
max_iters = 1_000_000  # fixed by the budget
min_lr = 1e-4
ema_decay = 0.999
beta_a = 1.5  # σ ~ Beta(1.5, 1): more high-noise steps, where a latent's layout is decided
beta_b = 1.0
eval_samples = 256
sample_prompts = ('a grinning face', 'a smiling face with sunglasses', 'a red heart',
                  'a blue heart', 'a red apple', 'a banana', 'a dog face', 'a cat face', 'fire',
                  'a star', 'the flag of Japan', 'a ghost', 'a rocket', 'a snowman',
                  'a four leaf clover', 'a pile of poo')
sample_cfg = 4.0
sample_steps = 20
compile = True  # eager where there is no C++ compiler
