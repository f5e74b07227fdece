"""
Draw assets/fidelity_curve.png, prompt fidelity against training time, from the runs in
docs/fidelity.md (matplotlib is only needed here: pip install matplotlib).

    python docs/plot_fidelity.py
"""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

# The 128-wide pixel denoiser (config/tiny_pixel.py --embed_dim=128) with max_iters scaled, timed
# with the CPU kernels since removed; eval.py over every caption once, cfg 4, 15 steps.
# (steps, minutes on 2 idle cores with compiling and evaluations, val top-5 %, held-out top-5 %)
RUNS = [
    (12_000, 4.2, 32.2, 26.3),
    (21_000, 8.1, 56.1, 40.9),
    (42_000, 14.3, 92.5, 68.8),
    (110_000, 35.5, 97.4, 81.1),
]
TARGETS = {'val': 50.0, 'held-out': 35.0}

TINY_STEPS = 21_000  # the fixed run of the pixel demo at the time, marked

fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
minutes = [r[1] for r in RUNS]
for column, name, color in ((2, 'val', 'tab:blue'), (3, 'held-out', 'tab:orange')):
    ax.plot(minutes, [r[column] for r in RUNS], 'o-', color=color, label=f'{name} top-5')
    ax.axhline(TARGETS[name], color=color, lw=0.8, ls=':')
tiny_minutes = next(r[1] for r in RUNS if r[0] == TINY_STEPS)
ax.axvline(tiny_minutes, color='gray', lw=0.8, ls='--')
ax.text(tiny_minutes + 0.2, 5, 'the demo then', color='gray', fontsize=8)
for r in RUNS:
    ax.annotate(f'{r[0] // 1000}k', (r[1], r[2]), textcoords='offset points', xytext=(-6, 6),
                fontsize=7)
ax.set_xlabel('minutes of training on 2 CPU cores (steps above the val points)')
ax.set_ylabel('top-5, % of captions')
ax.set_ylim(0, 100)
ax.set_xlim(0, max(minutes) + 1)
ax.grid(alpha=0.3)
ax.legend(loc='upper left', fontsize=8)
ax.set_title('Prompt fidelity against training time (dotted: 50% val, 35% held-out)', fontsize=9)
fig.tight_layout()
fig.savefig('assets/fidelity_curve.png')
print('wrote assets/fidelity_curve.png')
