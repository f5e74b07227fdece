# Few-step sampling: distil the emoji demo's model (out-tiny, config/tiny.py), guided at cfg 4,
# into a flow map that samples in 1-8 steps, in a quarter of the demo's minutes (README,
# Few-step sampling).
#   python train.py config/tiny_fewstep.py
#   python sample.py --out_dir=out-tiny-fewstep --prompt "a red apple" --steps 4
include('tiny.py')  # the demo's data and settings, then what differs
out_dir = 'out-tiny-fewstep'
init_from = 'out-tiny'  # its EMA weights; the architecture comes from the checkpoint
objective = 'flowmap'
teacher_cfg = 4.0  # distil the base model guided at cfg 4 (at σ > 0.2): one forward a step
p_uncond = 0.0  # guidance is in the weights
max_minutes = 2.0  # under a quarter of the demo's 8.5
learning_rate = 3e-4
warmup_iters = 50
min_lr = 3e-5
eval_interval = 1000
ckpt_interval = 1000
sample_steps = 4
