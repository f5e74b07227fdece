"""The one config mechanism: config files, --key=value, types, finiteness, one-line errors."""
import pytest

from configurator import ConfigError, configure, settings


def _config_namespace():
    return {'batch_size': 32, 'lr': 3e-4, 'compile': False, 'out_dir': 'out', 'init_from': None,
            'prompt': 'a cute owl', 'prompts': ('a cute owl',), 'interp': (), 'image_size': 32,
            'cfg': [7.0], 'sigmas': (0.1, 0.5)}


def test_configurator_files_and_overrides(tmp_path):
    cfg_file = tmp_path / 'my.py'
    cfg_file.write_text("import math\nbatch_size = 8\nlr = 1\nout_dir = 'out-x'\n")
    ns = _config_namespace()
    config = configure(ns, [str(cfg_file), '--batch_size=16', '--prompt', 'a cat, 2 dogs',
                            '--compile', '--init_from=resume', '--interp', 'a cat', 'a dog',
                            '--image_size', '64'])
    assert configure(_config_namespace(), ['--interp=("a", "b")'])['interp'] == ('a', 'b')
    assert configure(_config_namespace(), ['--interp', 'a'])['interp'] == ('a',)
    assert config == {**_config_namespace(), 'batch_size': 16, 'lr': 1.0, 'compile': True,
                      'out_dir': 'out-x', 'init_from': 'resume', 'prompt': 'a cat, 2 dogs',
                      'interp': ('a cat', 'a dog'), 'image_size': 64}
    assert type(config['lr']) is float and ns['batch_size'] == 16


def test_list_settings_take_several_values_and_keep_strings_as_written():
    c = configure(_config_namespace(), ['--prompts', 'a cat', '7', 'a dog', '--cfg', '1', '4'])
    assert c['prompts'] == ('a cat', '7', 'a dog') and c['cfg'] == [1.0, 4.0]
    assert configure(_config_namespace(), ['--cfg=1,4,7'])['cfg'] == [1.0, 4.0, 7.0]
    assert configure(_config_namespace(), ['--prompts', 'an owl'])['prompts'] == ('an owl',)
    assert configure(_config_namespace(), ['--prompts=()'])['prompts'] == ()
    assert configure(_config_namespace(), ['--sigmas', '1', '0.5'])['sigmas'] == (1.0, 0.5)


def test_library_settings_are_checked_like_the_command_line():
    c = settings(_config_namespace(), dict(batch_size=4, lr=1))
    assert c.batch_size == 4 and c.lr == 1.0 and c.out_dir == 'out'
    with pytest.raises(ConfigError, match="unknown config key 'batch_sise'"):
        settings(_config_namespace(), dict(batch_sise=4))
    with pytest.raises(ConfigError, match="'lr' must be a finite number"):
        settings(_config_namespace(), dict(lr=float('nan')))


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=8'], "unknown config key 'batch_sise' (did you mean batch_size?)"),
    (['--lr=fast'], "config key 'lr' expects float"),
    (['--batch_size=0.5'], "config key 'batch_size' expects int"),
    (['--batch_size'], "config key 'batch_size' needs a value"),
    (['nofile.txt'], "unexpected argument 'nofile.txt'"),
    (['config/missing.py'], "cannot read config file 'config/missing.py'"),
    (['--lr=1e999'], "config key 'lr' must be a finite number, got inf"),
    (['--lr', 'nan'], "config key 'lr' must be a finite number"),
    (['--cfg', '1', 'inf'], "config key 'cfg' must be a finite number"),
    (['--prompt', 'a', 'cat'], "config key 'prompt' takes one value, got 2"),
])
def test_configurator_errors_are_one_line(argv, message):
    with pytest.raises(SystemExit) as err:
        configure(_config_namespace(), argv)
    assert message in str(err.value) and '\n' not in str(err.value)


def test_a_config_file_cannot_set_a_non_finite_float(tmp_path):
    cfg_file = tmp_path / 'bad.py'
    cfg_file.write_text("lr = float('inf')\n")
    with pytest.raises(SystemExit, match="'lr' must be a finite number"):
        configure(_config_namespace(), [str(cfg_file)])


def test_config_files_include_their_base_beside_them_not_from_the_working_dir(tmp_path,
                                                                               monkeypatch):
    """include('base.py') runs the file next to the including one, whatever the working directory
    holds; nested includes resolve from their own file, and later includes from the first again."""
    (tmp_path / 'cfg' / 'sub').mkdir(parents=True)
    (tmp_path / 'cfg' / 'base.py').write_text("batch_size = 8\nout_dir = 'base'\n")
    (tmp_path / 'cfg' / 'sub' / 'mid.py').write_text("include('../base.py')\nlr = 2\n")
    (tmp_path / 'cfg' / 'sub' / 'top.py').write_text(
        "include('mid.py')\ninclude('other.py')\nout_dir = 'top'\n")
    (tmp_path / 'cfg' / 'sub' / 'other.py').write_text("image_size = 64\n")
    planted = tmp_path / 'cwd'
    (planted / 'cfg').mkdir(parents=True)
    (planted / 'mid.py').write_text("batch_size = 999\n")  # what a cwd-relative path would run
    monkeypatch.chdir(planted)
    c = configure(_config_namespace(), [str(tmp_path / 'cfg' / 'sub' / 'top.py')])
    assert (c['batch_size'], c['lr'], c['image_size'], c['out_dir']) == (8, 2.0, 64, 'top')


@pytest.mark.parametrize('body, message', [
    ("import sys\nsys.exit(0)\n", "failed: SystemExit: 0"),
    ("raise KeyboardInterrupt\n", "failed: KeyboardInterrupt"),
    ("x = 1 / 0\n", "failed: ZeroDivisionError: division by zero"),
    ("include('nothing.py')\n", "cannot read config file"),
])
def test_a_config_file_that_exits_or_raises_is_one_line_naming_it(tmp_path, body, message):
    cfg_file = tmp_path / 'bad.py'
    cfg_file.write_text(body)
    with pytest.raises(SystemExit) as err:
        configure(_config_namespace(), [str(cfg_file)])
    assert message in str(err.value) and str(tmp_path) in str(err.value)
    assert str(err.value).startswith('error: ') and '\n' not in str(err.value)


def test_a_str_setting_takes_the_text_as_written_and_files_are_utf8(tmp_path, monkeypatch):
    for text in ("('a cat', 'a dog')", '(1, 2)', '7', 'True', '[1]'):
        assert configure(_config_namespace(), ['--prompt', text])['prompt'] == text
        assert configure(_config_namespace(), [f'--prompt={text}'])['prompt'] == text
    cfg_file = tmp_path / 'utf8.py'
    cfg_file.write_text("prompt = 'un café, σ'  # ünïcode\n", encoding='utf-8')
    monkeypatch.setenv('LC_ALL', 'C')  # the file is read as UTF-8 whatever the locale
    assert configure(_config_namespace(), [str(cfg_file)])['prompt'] == 'un café, σ'
    cfg_file.write_bytes("prompt = 'caf\xe9'\n".encode('latin-1'))
    with pytest.raises(SystemExit, match=r"utf8.py, line 1: not UTF-8"):
        configure(_config_namespace(), [str(cfg_file)])
