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
