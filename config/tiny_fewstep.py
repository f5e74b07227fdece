# Few-step sampling: consistency-tune the emoji demo's model (out-tiny, config/tiny.py) so that it
# samples in 1-4 steps, in a quarter of the demo's minutes (README, Few-step sampling).
#   python train.py config/tiny_fewstep.py
#   python sample.py --out_dir=out-tiny-fewstep --prompt "a red apple" --steps 4
include('tiny.py')  # the demo's data and settings, then what differs
out_dir = 'out-tiny-fewstep'
init_from = 'out-tiny'  # its EMA weights; the architecture comes from the checkpoint
objective = 'consistency'
consistency_gap = (0.5, 0.02)  # r = (1 - gap)·t, the gap shrinking geometrically to 2%
teacher_cfg = 4.0  # distil the base model guided at cfg 4: sampling needs one forward a step
p_uncond = 0.0  # guidance is in the weights
max_minutes = 2.0
learning_rate = 3e-4
warmup_iters = 50
min_lr = 3e-5
eval_interval = 1000
ckpt_interval = 1000
sample_steps = 4
