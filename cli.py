"""What train.py, sample.py and evaluate.py share at the shell boundary.

- `--name=value` overrides of a script's defaults (nanoGPT style), type-checked;
- `UserError`: a mistake the user can fix. `run(main)` prints it as one line,
  `error: ...`, and exits with status 2 instead of a traceback;
- the "auto" device choice, and files written atomically (a temporary file in the
  same folder, fsync, os.replace) so a crash never leaves a half-written one.
"""
import ast
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager

import torch


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix.

    every_rank: under torchrun, an error only this rank meets (otherwise rank 0 speaks for all)."""

    def __init__(self, message, every_rank=False):
        super().__init__(message)
        self.every_rank = every_rank


def parse_overrides(defaults, argv, script):
    """Return a copy of `defaults` with `--name=value` arguments applied.

    A value must have the default's type (an int is accepted for a float);
    strings need no quotes; a bare --flag sets a boolean to True. Unknown names and malformed arguments are UserErrors.
    Returns (config, names that were set on the command line).
    """
    config, given = dict(defaults), set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"usage: python {script} [--name=value ...]\n\noptions and their defaults:")
            for name, value in defaults.items():
                print(f"  --{name}={value}")
            sys.exit(0)
        if arg.startswith("--") and "=" not in arg and isinstance(defaults.get(arg[2:]), bool):
            arg += "=True"  # a bare --flag switches a boolean on
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: write options as --name=value (see python {script} --help)")
        name, text = arg[2:].split("=", 1)
        if name not in defaults:
            close = [k for k in defaults if k.startswith(name[:3])]
            hint = f" (did you mean {', '.join('--' + k for k in close)}?)" if close else ""
            raise UserError(f"unknown option --{name}{hint}; python {script} --help lists them all")
        config[name] = convert(name, text, defaults[name])
        given.add(name)
    return config, given


def convert(name, text, default):
    """Parse `text` into the type of `default`, or raise a UserError naming both."""
    want = type(default)
    if want is str:
        return text
    if want is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if want is float and type(value) is int:
            value = float(value)
        if want is float and type(value) is float and not math.isfinite(value):  # 1e309 reads as inf
            raise UserError(f"--{name}={text} is not a finite number; give e.g. --{name}={default}")
        if type(value) is want:
            return value
    kind = {bool: "True or False", int: "a whole number", float: "a number"}[want]
    raise UserError(f"--{name}={text} is not {kind} (default: {default!r}); "
                    f"give e.g. --{name}={default}")


def first_line(error, width=100):
    """An exception as a short phrase for a one-line message: its first line, or its type if it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:width]


def require(condition, message):
    if not condition:
        raise UserError(message)


def run(main):
    """Run main(argv); a UserError becomes a one-line message and exit status 2.

    Under torchrun every rank meets the same error, and only rank 0 prints it. Output whose
    reader has gone (python train.py --help | head -3) ends the run quietly, with status 1."""
    try:
        try:
            main(sys.argv[1:])
        finally:
            sys.stdout.flush()  # a closed pipe raises here, not in Python's own flush at exit
    except UserError as e:
        if e.every_rank or os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        sys.exit(1)


def print_results(results, as_json, print_table):
    """--json: one JSON object on stdout, for scripts; otherwise print_table(results), for people."""
    if as_json:
        print(json.dumps(results))
    else:
        print_table(results)


def pick_device(name):
    """'auto' -> cuda, then mps, then cpu; anything else must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    require(available.get(device.type, False), f"device {name!r} is not available on this machine; use --device=auto")
    return device


TEMPORARY_MARK = ".tmp"
UMASK = os.umask(0o022)
os.umask(UMASK)


def remove_stale_temporaries(folder):
    """Delete what atomic_write left behind when a process was killed mid-write (SIGKILL, power loss)."""
    for name in os.listdir(folder):
        if name.startswith(".") and TEMPORARY_MARK in name:
            os.remove(os.path.join(folder, name))


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step.

    On any failure the temporary file is removed and `path` is left as it was. A failure to
    write (a full disk, a file-size limit, a folder that cannot be made) is a UserError.
    The temporary name keeps the extension, so savers that infer the format from it work.
    """
    # Replacing a folder or a device (/dev/null) with a file would be a surprise, not a save.
    require(not os.path.lexists(path) or os.path.isfile(path),
            f"{path} exists and is not a regular file; write to a file path instead")
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        base, ext = os.path.splitext(os.path.basename(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{base[:100]}.", suffix=f"{TEMPORARY_MARK}{ext[:20]}", dir=folder)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a short write as a RuntimeError from its zip writer (inline_container.cc:
        # "unexpected pos", or "file write failed"); other RuntimeErrors are bugs and keep their traceback.
        if isinstance(e, RuntimeError) and "inline_container" not in str(e) and "write" not in str(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the file stopped short: a full disk or a size limit"
        raise UserError(f"cannot write {path} ({reason}); free some disk space or choose another path. "
                        f"Nothing was replaced") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
