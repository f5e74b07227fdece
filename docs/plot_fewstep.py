"""
Draw assets/fewstep.png: the same prompts and noise through the demo's model with DPM-Solver++
(cfg 4 at σ > 0.2) and through its flow map (config/tiny_fewstep.py), a row per sampler and step
count: DPM-Solver++ at 1, 4, 15 steps, then the flow map at 1, 4, 8 (the README's table). Saved
with a 256-colour palette, a quarter of the bytes.

    python docs/plot_fewstep.py               # out-tiny, out-tiny-fewstep -> assets/fewstep.png
    python docs/plot_fewstep.py --prompt "a sleepy cat" "a bowl of hot noodle soup"
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from configurator import configure  # noqa: E402
from sample import generate_images, load_pipeline, save_grid  # noqa: E402

base = 'out-tiny'
fewstep = 'out-tiny-fewstep'
prompt = ('a grinning face', 'a red heart', 'a red apple', 'a dog face', 'a cat face', 'a star',
          'a ghost', 'a snowman')
cfg = 4.0
base_steps = (1, 4, 15)
map_steps = (1, 4, 8)
seed = 0  # every image starts from this seed's noise
out = 'assets/fewstep.png'

if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    rows = []
    for run, steps_list, settings in ((base, base_steps, dict(cfg=cfg)), (fewstep, map_steps, {})):
        pipe = load_pipeline(run, 'cpu')
        rows += [generate_images(pipe, list(prompt), seed=seed, steps=k, **settings)
                 for k in steps_list]
    save_grid(torch.cat(rows), len(prompt), out, zoom=1)
    Image.open(out).quantize(256).save(out, optimize=True)
    print(f"wrote {out}: rows DPM-Solver++ {base_steps} steps, then the flow map {map_steps}")
