# The emoji set at 64 px, fine-tuned from the 32 px tiny model (config/tiny.py -> out-tiny): the
# positional table is resized bilinearly from 8×8 to 16×16 patches, and a few hundred steps teach
# the model the finer grid.
#   apt-get install fonts-noto-color-emoji
#   python data/emoji/build.py --image_size=64 \
#       --font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
#   python prepare.py --source=emoji --image_size=64
#   python train.py config/tiny_64.py
# the baseline, from scratch at 64 px:
#   python train.py config/tiny_64.py --init_from=scratch --out_dir=out-tiny-64-scratch \
#       --learning_rate=1.5e-3 --warmup_iters=100
exec(open("config/tiny.py").read())  # the tiny run (its architecture for --init_from=scratch)
out_dir = 'out-tiny-64'
data_dir = 'data/prepared/emoji64'
init_from = 'out-tiny'  # the architecture comes from the checkpoint
max_minutes = 0.0  # a fixed number of steps
eval_interval = 100
ckpt_interval = 100
log_interval = 25
batch_size = 32  # 16×16 = 256 tokens an image: 4× the 32 px cost
learning_rate = 5e-4  # lower than from scratch: the weights are already good
warmup_iters = 20
max_iters = 300
min_lr = 5e-5
