# The CPU demo for twice as long: prompt fidelity pays for the time (README, Evaluation).
#   python train.py config/tiny_long.py
exec(open('config/tiny.py').read())  # the tiny run's settings, then what differs
out_dir = 'out-tiny-long'
max_minutes = 17.0
eval_interval = 7000
ckpt_interval = 7000
