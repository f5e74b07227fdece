"""
gpu_check.py on a CPU: its checks at tiny sizes, and how it ends when something goes wrong.

    python -m pytest -q tests/test_gpu_check.py
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest

from conftest import ROOT, one_line_error, run_in_process, run_script

import gpu_check

CPU_TINY = ['--device=cpu', '--tiny', '--compile=False']


def rows(stdout):
    return [line for line in stdout.splitlines()
            if line.startswith('| ') and not line.startswith('| check |')]


def run_main(monkeypatch, capsys, todo, *argv):
    """gpu_check.main with these checks in this process -> (exit status, stdout)."""
    monkeypatch.setattr(gpu_check, 'checks', lambda: todo)
    with pytest.raises(SystemExit) as e:
        gpu_check.main([*CPU_TINY, *argv])
    return e.value.code, capsys.readouterr().out


def test_gpu_check_passes_on_cpu_at_tiny_sizes():
    """Every check at tiny sizes: SDPA matches its definition, train steps run, 36 images sample
    through sample.py, torchrun's 10 + resume matches 20 straight, fp16 trains, train.py's run
    has no recompiles."""
    proc = run_script('gpu_check.py', *CPU_TINY,
                      env={'OMP_NUM_THREADS': '1'})  # 2 threads on a busy 2-core machine crawl
    table = rows(proc.stdout)
    assert len(table) == 6 and all(' | pass | ' in row for row in table), proc.stdout
    resume = next(row for row in table if 'resume' in row)
    assert 'RNG states bitwise equal, data position bitwise equal' in resume
    assert 'weights max abs difference 0.0e+00' in resume  # on a CPU, bitwise
    assert '0 recompiles' in table[-1]


def test_without_a_gpu_it_says_to_use_the_cpu_in_one_line():
    with (mock.patch('torch.cuda.is_available', return_value=False),
          mock.patch('torch.cuda.device_count', return_value=0)):  # a machine without a GPU
        proc = run_in_process('gpu_check.py', check=False)
    assert '--device=cpu --tiny' in one_line_error(proc)
    assert '| check |' not in proc.stdout  # stopped before any check


def test_a_failed_child_shows_its_own_error_line(monkeypatch, capsys):
    """torchrun of train.py on 3 processes, whose global batch of 16 rows cannot split: the row
    gives train.py's one-line error, not the last line of torchrun's report (its ===== banner)."""
    code, out = run_main(monkeypatch, capsys, [('resume', gpu_check.check_resume)], '--nproc=3')
    [row] = rows(out)
    assert code == 1 and ' | FAIL | ' in row
    assert 'error: the global batch' in row and '=====' not in row and 'ChildFailedError' not in row


def test_time_limit_stops_a_hung_child_and_keeps_the_rows_so_far(monkeypatch, capsys):
    pids = []

    def hangs(tmp):
        cmd = [sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); '
                                     'time.sleep(600)']
        code, output = gpu_check.run_child(cmd)
        pids.append(int(output.split()[0]))
        return code == 0, f'the child ended with {code}'

    monkeypatch.setattr(gpu_check, 'GRACE_S', 600)  # the watchdog would end pytest itself
    todo = [('quick', lambda tmp: (True, 'fine')), ('hangs', hangs),
            ('never', lambda tmp: (True, 'ran'))]
    t0 = time.time()
    code, out = run_main(monkeypatch, capsys, todo, '--max_minutes=0.05')
    assert code == 1 and time.time() - t0 < 30
    assert [row.split(' | ')[:2] for row in rows(out)] == [['| quick', 'pass'], ['| hangs', 'FAIL']]
    assert 'time limit' in out and 'not run: never' in out
    assert all(re.search(r' \[\d+ s\] \|$', row) for row in rows(out))  # each with its time
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # the child is gone


def alive(pid):
    """Whether pid runs: in /proc and not a zombie (an orphan's end, until init reaps it)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


HUNG_WORKER = '''
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as deaf as a worker hung in an NCCL call
open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()
time.sleep(600)
'''


def test_time_limit_stops_torchrun_and_its_hung_workers(monkeypatch, tmp_path):
    """torchrun starts each worker in a session of its own: killing torchrun's process group
    left them running, with the output pipe open, and run_child waiting on it for ever. At the
    time limit it returns, torchrun and its workers gone, even workers that ignore SIGTERM."""
    script, pid_dir = tmp_path / 'hang.py', tmp_path / 'pids'
    script.write_text(HUNG_WORKER)
    pid_dir.mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(script), str(pid_dir)]
    monkeypatch.setattr(gpu_check, 'deadline', time.time() + 10)  # the workers start in ~2 s
    result, t0 = [], time.time()
    thread = threading.Thread(target=lambda: result.append(gpu_check.run_child(cmd)),
                              daemon=True)
    thread.start()
    pids = []
    try:
        thread.join(45)
        took = time.time() - t0
        pids = [int(name) for name in os.listdir(pid_dir)]
        assert len(pids) == 2, 'the workers did not start within the time given'
        assert not thread.is_alive(), f"run_child still waits after {took:.0f} s, workers " \
            f"{[pid for pid in pids if alive(pid)]} alive"
        assert took < 30 and result[0][0] is None  # stopped at the time limit
        for _ in range(50):  # SIGKILL's end is not instant
            if not any(map(alive, pids)):
                break
            time.sleep(0.1)
        assert not [pid for pid in pids if alive(pid)], 'workers left running'
    finally:  # whatever happened, no worker outlives the test
        for pid in pids or map(int, os.listdir(pid_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_time_limit_ends_a_check_that_hangs_in_the_process():
    """A hung CUDA call never returns to Python: the watchdog thread prints and exits 1."""
    script = ("import sys, time; import gpu_check; gpu_check.GRACE_S = 0; "
              "gpu_check.checks = lambda: [('quick', lambda tmp: (True, 'fine')), "
              "('hangs', lambda tmp: time.sleep(600))]; "
              f"gpu_check.main({CPU_TINY + ['--max_minutes=0.02']!r})")
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert [row.split(' | ')[:2] for row in rows(proc.stdout)] == [['| quick', 'pass']]
    assert "time limit of 0.02 minutes ran out in 'hangs'" in proc.stdout
