"""
nanoGPT's "poor man's configurator", with its traps fixed. Every script does

    from configurator import configure
    config = configure(globals(), sys.argv[1:])

and then reads its settings as plain module globals. The arguments are applied in order:

    python train.py config/tiny.py --batch_size=64 --compile=False
    python sample.py --prompt "a cute owl" --cfg 7 --n=4
    python sample.py --interp "a cat" "a dog" --frames 8

- `config/x.py` (a path, not starting with --) is executed; it may set any existing global.
- `--key=value` and `--key value` both work. A value is parsed as a Python literal when it is one
  (7, 3e-4, True, None, (32, 64)) and kept as a string otherwise ("a cute owl").
- `--key v1 v2 ...` gives a list; `--flag` alone sets a bool to True.
- A `None` default accepts any value; an int is accepted for a float; anything else must match the
  default's type. Unknown keys and wrong types are one-line errors naming the key.

Scripts report bad input with fail(message): "error: message" on stderr, exit status 1, no
traceback.
"""
import ast
import difflib

CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))


class ConfigError(ValueError):
    pass


def fail(message):
    """Bad input: one line, "error: <message>", on stderr and exit status 1 (a SystemExit)."""
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
    if default is None or value is None:
        return value
    if type(default) is float and type(value) is int:
        return float(value)  # --lr=1 means 1.0
    if type(default) in (tuple, list) and type(value) in (tuple, list):
        return type(default)(value)
    if type(default) in (tuple, list) and type(value) is not type(default):
        return type(default)([value])  # a single value for a list-valued key
    if type(value) is not type(default):
        raise ConfigError(f"config key '{key}' expects {type(default).__name__} "
                          f"(default {default!r}), got {value!r}")
    return value


def _check_key(key, keys, where):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{where}{hint}")


def configure(namespace, argv, exit_on_error=True):
    """Apply config files and --key overrides from argv to namespace (a script's globals()).
    Returns the resulting config dict {key: value}, the thing to log and to save in checkpoints."""
    keys = config_keys(namespace)
    try:
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith('--'):
                if not arg.endswith('.py'):
                    raise ConfigError(f"unexpected argument '{arg}': expected a config file "
                                      f"(config/*.py) or --key=value")
                _apply_file(namespace, keys, arg)
                i += 1
                continue
            key, eq, text = arg[2:].partition('=')
            _check_key(key, keys, '')
            if eq:
                texts, i = [text], i + 1
            else:  # --key v1 [v2 ...] up to the next --option
                j = i + 1
                while j < len(argv) and not argv[j].startswith('--'):
                    j += 1
                texts, i = argv[i + 1:j], j
            default = namespace[key]
            # a str setting takes the text as written: --prompt "1, 2, 3" stays a string
            values = texts if type(default) is str else [_parse(t) for t in texts]
            if not values:
                if type(default) is not bool:
                    raise ConfigError(f"config key '{key}' needs a value")
                value = True
            elif len(values) == 1 and (type(default) not in (tuple, list)
                                       or type(values[0]) in (tuple, list)):
                value = values[0]  # --size 64, or --eval_sigmas="(0.1, 0.5)" as one literal
            else:
                value = values
            if type(default) is str and isinstance(value, list):
                value = ' '.join(str(v) for v in value)  # --prompt a cute owl (unquoted)
            namespace[key] = _coerce(key, value, default)
    except ConfigError as e:
        if not exit_on_error:
            raise
        fail(e)
    return {k: namespace[k] for k in keys}


def _apply_file(namespace, keys, path):
    try:
        source = open(path).read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    scope = {}
    try:
        exec(compile(source, path, 'exec'), scope)
    except Exception as e:
        raise ConfigError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
    for key, value in scope.items():
        if key.startswith('_') or type(value) not in CONFIG_TYPES:
            continue  # imports and helpers inside the config file
        _check_key(key, keys, f" in {path}")
        namespace[key] = _coerce(key, value, namespace[key])
