"""
nanoGPT's "poor man's configurator", with its traps fixed. A script's settings are its globals:

    config = configure(globals(), sys.argv[1:])   # python train.py config/tiny.py --n_layers=6

Arguments apply in order: a config/*.py file is executed and may set any existing global, and
include('tiny.py') there runs another config file first, found beside it; --key=value or --key
value is a Python literal where it parses as one (7, 3e-4, True, (32, 64)) and text otherwise,
and a str setting takes the text as written; --key v1 v2 gives a tuple or list setting several
values; --flag alone is True. Types must match the default's (an int passes for a float; None
takes anything), floats must be finite, and unknown keys are errors: one line each, through
fail(message). A library call with keyword arguments gets the same checks from
settings(defaults, overrides).
"""
import ast
import difflib
import math
import os
import sys
from types import SimpleNamespace

CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))


class ConfigError(ValueError):
    pass


def fail(message):
    """Bad input: "error: <message>" on stderr and exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


def config_keys(namespace):
    """The overridable settings of a script: its public globals of plain types."""
    return [k for k, v in namespace.items()
            if not k.startswith('_') and type(v) in CONFIG_TYPES]


def _parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string like a prompt


def _coerce(key, value, default):
    if type(default) in (tuple, list):
        values = value if type(value) in (tuple, list) else [value]  # one value for a list key
        kind = type(default[0]) if default else None
        return type(default)(_coerce(key, v, kind() if kind else None) for v in values)
    if type(default) is float and type(value) in (int, str):
        try:
            value = float(value)  # --lr=1 means 1.0, and --cfg nan is a non-finite number
        except ValueError:
            pass
    if default is not None and value is not None and type(value) is not type(default):
        raise ConfigError(f"config key '{key}' expects {type(default).__name__} "
                          f"(default {default!r}), got {value!r}")
    if type(value) is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def _check_key(key, keys, where=''):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{where}{hint}")


def _value(key, texts, default):
    """The value of --key from the texts after it. Text stays as written for str settings and
    for lists of strings: --prompt "('a', 'b')" is one prompt; () alone is an empty list."""
    strings = type(default) in (tuple, list) and all(type(v) is str for v in default or [0])
    if strings and texts in (['()'], ['[]']):
        return type(default)()
    values = list(texts) if strings or type(default) is str else [_parse(t) for t in texts]
    if not values:
        if type(default) is not bool:
            raise ConfigError(f"config key '{key}' needs a value")
        return True
    if type(default) in (tuple, list):
        return values[0] if len(values) == 1 and type(values[0]) in (tuple, list) else values
    if len(values) > 1:
        raise ConfigError(f"config key '{key}' takes one value, got {len(values)}: "
                          f"{values!r} (quote a value with spaces)")
    return values[0]


def read_text(path):
    """A UTF-8 text file's contents, whatever the locale; else a one-line ValueError that names the
    file and the line."""
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); save it as UTF-8") from None


def configure(namespace, argv):
    """Apply config files and --key overrides from argv to namespace (a script's globals()).
    Returns the resulting config dict {key: value}, the thing to log and to save in checkpoints."""
    for stream in (sys.stdout, sys.stderr):  # a script never dies printing σ to a latin-1 console
        if hasattr(stream, 'reconfigure'):  # not a StringIO that captures it
            stream.reconfigure(errors='backslashreplace')
    keys = config_keys(namespace)
    try:
        i = 0
        while i < len(argv):
            arg, i = argv[i], i + 1
            if not arg.startswith('--'):
                if not arg.endswith('.py'):
                    raise ConfigError(f"unexpected argument '{arg}': expected a config file "
                                      f"(config/*.py) or --key=value")
                _apply_file(namespace, keys, arg)
                continue
            key, eq, text = arg[2:].partition('=')
            _check_key(key, keys)
            j = i
            while not eq and j < len(argv) and not argv[j].startswith('--'):
                j += 1  # --key v1 [v2 ...] up to the next --option
            texts, i = ([text], i) if eq else (argv[i:j], j)
            namespace[key] = _coerce(key, _value(key, texts, namespace[key]), namespace[key])
    except ConfigError as e:
        fail(e)
    return {k: namespace[k] for k in keys}


def given_keys(argv):
    """The settings that argv sets, in a config file or by a flag (a config file is read again)."""
    keys = set()
    for arg in argv:
        if arg.startswith('--'):
            keys.add(arg[2:].partition('=')[0])
        elif arg.endswith('.py'):
            keys |= set(load_config(arg))
    return keys


def settings(defaults, overrides):
    """defaults (a dict) with keyword overrides, checked like the command line -> a namespace."""
    keys = config_keys(defaults)
    for key in overrides:
        _check_key(key, keys)
    return SimpleNamespace(**{k: _coerce(k, overrides.get(k, v), v) for k, v in defaults.items()
                              if k in keys})


def _run_file(path, scope):
    """Execute a config file in scope; include('other.py') inside it runs a file beside it."""
    try:
        source = read_text(path)
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"config file {e}") from None
    def include(name):  # a path relative to this file, never to the working directory
        _run_file(os.path.join(os.path.dirname(os.path.abspath(path)), name), scope)
        scope['include'] = include  # back to this file's, after the other file's own
    scope['include'] = include
    try:
        exec(compile(source, path, 'exec'), scope)
    except ConfigError:
        raise  # an included file's own error names that file
    except BaseException as e:  # sys.exit() and Ctrl-C in a config file end the run here too
        raise ConfigError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None


def load_config(path):
    """The settings a config file makes, includes included: {key: value}."""
    scope = {}
    _run_file(path, scope)
    return {k: v for k, v in scope.items()  # not imports and helpers inside the config file
            if not k.startswith('_') and type(v) in CONFIG_TYPES}


def _apply_file(namespace, keys, path):
    for key, value in load_config(path).items():
        _check_key(key, keys, f" in {path}")
        namespace[key] = _coerce(key, value, namespace[key])
