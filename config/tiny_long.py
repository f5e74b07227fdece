# The CPU demo for twice as long: 42,000 steps, about 14 minutes on 2 cores. Prompt fidelity pays
# for the time: every caption once, cfg 4, top-5 of 92.5% on val and 68.8% on the held-out split
# (against 56.1% and 40.9% in 21,000 steps), and 13 of the grid's 16 prompts drawn (README).
#   python train.py config/tiny_long.py
exec(open('config/tiny.py').read())  # the tiny run's settings, then what differs
out_dir = 'out-tiny-long'
max_iters = 42000
eval_interval = 7000
ckpt_interval = 7000
