# The CPU demo for twice as long: 28,000 steps, about 20 minutes on 2 cores. Prompt fidelity pays
# for the time: every caption once, cfg 4, top-5 of 75.6% on val and 53.8% on the held-out split
# (against 36.7% and 29.5% in 14,000 steps, README, Evaluation).
#   python train.py config/tiny_long.py
exec(open('config/tiny.py').read())  # the tiny run's settings, then what differs
out_dir = 'out-tiny-long'
max_iters = 28000
eval_interval = 7000
ckpt_interval = 7000
