# The CPU demo: the emoji set in pixel space (3×32×32) with MiniLM captions, in a time budget:
# train.py measures its step time and fits max_iters to it, so the whole README command ends
# within 10 minutes on 2 cores of any x86 CPU (README, Evaluation, has what each kind reaches).
#   python train.py config/tiny.py
out_dir = 'out-tiny'
data_dir = 'data/prepared/emoji32'  # made on first use (python prepare.py --source=emoji)
eval_interval = 3000
ckpt_interval = 3000
log_interval = 500
batch_size = 16  # small batches, many steps
gradient_accumulation_steps = 1
patch_size = 4  # 8×8 = 64 tokens: a quarter of the tokens of patch 2
embed_dim = 64  # narrow and fast: in the budget, steps beat width (docs/fidelity.md)
n_layers = 4
head_dim = 32  # 2 heads
mlp_multiplier = 2  # cheaper steps: at equal time its prompts beat a 4x MLP's
learning_rate = 1.5e-3
warmup_iters = 100
max_minutes = 8.5  # preparing the data and compiling included: all of it ends within 10
max_iters = 1_000_000  # fixed by the budget
min_lr = 1e-4
ema_decay = 0.999
beta_b = 1.0  # σ ~ Beta(1, 1), uniform: in pixel space at 32 px, shapes form at high noise
eval_samples = 256
sample_prompts = ('a grinning face', 'a smiling face with sunglasses', 'a red heart',
                  'a blue heart', 'a red apple', 'a banana', 'a dog face', 'a cat face', 'fire',
                  'a star', 'the flag of Japan', 'a ghost', 'a rocket', 'a snowman',
                  'a four leaf clover', 'a pile of poo')
sample_cfg = 4.0
sample_steps = 20
compile = True  # eager where there is no C++ compiler
