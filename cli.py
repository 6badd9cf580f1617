"""What train.py, sample.py and evaluate.py share at the shell boundary.

- `--name=value` overrides of a script's defaults (nanoGPT style), type-checked, and preset
  files (config/NAME.py: `name = value` lines) read with ast, never run;
- `UserError`: a mistake the user can fix. `run(main)` prints it as one line,
  `error: ...`, and exits with status 2 instead of a traceback;
- the "auto" device choice, and files written atomically (a temporary file in the
  same folder, fsync, os.replace) so a crash never leaves a half-written one;
- RunLock: one writer per run folder at a time; StopRequest: Ctrl-C and SIGTERM, acted on later;
- save_grid: an image grid (torchvision.utils.save_image), written atomically.
"""
import ast
import fcntl
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
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

    A value must have the default's type (an int is accepted for a float); strings need no quotes; a bare
    --flag sets a boolean to True. Unknown names and malformed arguments are UserErrors. Returns (config,
    names that were set on the command line).
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
            raise UserError(f"cannot read argument {arg!r}: write options as --name=value (see python "
                            f"{script} --help)")
        name, text = arg[2:].split("=", 1)
        if name not in defaults:
            raise unknown_option(name, defaults, script, prefix="--")
        config[name] = convert(name, text, defaults[name])
        given.add(name)
    return config, given


KINDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a string in quotes"}


def typed(value, default):
    """`value` as the type of `default` (an int is taken for a float), or None where it is not one."""
    if type(default) is float and type(value) is int:
        value = float(value)
    if type(value) is float and not math.isfinite(value):  # 1e309 reads as inf
        return None
    return value if type(value) is type(default) else None


def convert(name, text, default):
    """Parse `text` into the type of `default`, or raise a UserError naming both."""
    if type(default) is str:
        return text
    if type(default) is bool:
        value = {"true": True, "1": True, "yes": True, "false": False, "0": False,
                 "no": False}.get(text.lower())
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    result = typed(value, default)
    if result is None:
        infinite = type(value) is float and not math.isfinite(value)  # 1e309 reads as inf
        kind = "a finite number" if infinite and type(default) is float else KINDS[type(default)]
        raise UserError(f"--{name}={text} is not {kind} (default: {default!r}); give e.g. --{name}={default}")
    return result


def unknown_option(name, defaults, script, prefix=""):
    """The UserError for an option `defaults` does not have, with the names that start alike."""
    close = [prefix + k for k in defaults if k.startswith(name[:3])]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown option {prefix}{name}{hint}; python {script} --help lists them all")


def read_presets(argv, defaults, script):
    """(values, names, the other arguments): the preset files among `argv` (arguments that do not start with
    "-"), read in order, as {option: value}; names are the files' stems, e.g. ["hybrid"].

    A preset holds `name = value` lines (a literal: number, string, True or False) and comments, and nothing
    else; it is parsed with ast and never run. Each name must be one of `defaults`, of its type. Anything
    else is a UserError naming the file and the line."""
    values, names, rest = {}, [], []
    for arg in argv:
        if arg.startswith("-"):
            rest.append(arg)
            continue
        try:
            with open(arg, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise UserError(f"cannot read preset {arg} ({reason}); options are --name=value, and a "
                            "preset is a file such as config/hybrid.py") from None
        try:
            tree = ast.parse(source, arg)
        except SyntaxError as e:
            raise UserError(f"{arg}, line {e.lineno}: not valid Python ({e.msg}); a preset holds "
                            "`name = value` lines and comments") from None
        for node in tree.body:
            where = f"{arg}, line {node.lineno}"
            simple = isinstance(node, ast.Assign) and len(node.targets) == 1
            if not (simple and isinstance(node.targets[0], ast.Name)):
                statement = ast.get_source_segment(source, node) or type(node).__name__
                raise UserError(f"{where}: a preset holds only `name = value` lines and comments, not "
                                f"{first_line(statement, 60)!r}")
            name = node.targets[0].id
            if name not in defaults:
                raise UserError(f"{where}: {unknown_option(name, defaults, script)}")
            try:
                value = typed(ast.literal_eval(node.value), defaults[name])
            except ValueError:  # not a literal: a name, a call, an expression
                value = None
            if value is None:
                raise UserError(f"{where}: {name} must be {KINDS[type(defaults[name])]}, like its default "
                                f"{defaults[name]!r}, not "
                                f"{first_line(ast.get_source_segment(source, node.value), 60)}")
            values[name] = value
        names.append(os.path.splitext(os.path.basename(arg))[0])
    return values, names, rest


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
    require(available.get(device.type, False), f"device {name!r} is not available on this machine; use "
                                               "--device=auto")
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
        reason = e.strerror if isinstance(e, OSError) and e.strerror else \
            "the file stopped short: a full disk or a size limit"
        raise UserError(f"cannot write {path} ({reason}); free some disk space or choose another path. "
                        f"Nothing was replaced") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def unwritable(folder, option, error):
    """The one-line error for a run folder that cannot be written (check_writable's and RunLock's)."""
    return UserError(f"cannot write to {option}{folder} ({error.strerror}); choose a writable folder "
                     "with free space")


def check_writable(folder, option="--out_dir="):
    """Fail before training, not after the first epoch, if checkpoints cannot be written there."""
    try:
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, ".write_test")) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\0" * 65536)
        os.remove(os.path.join(folder, ".write_test"))
    except OSError as e:
        raise unwritable(folder, option, e) from None


def save_grid(images, path, nrow=8, pad_value=0.0):
    """(N, C, H, W) images in [0, 1] as one image file, `nrow` to a row, replaced atomically."""
    from torchvision.utils import save_image  # imported here: 1.5 s that only a script that saves grids pays
    with atomic_write(path) as tmp:
        save_image(images, tmp, nrow=nrow, padding=2, pad_value=pad_value)


class StopRequest:
    """Ctrl-C or SIGTERM: remembered here (signum), acted on where the loop can stop cleanly."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        for s in self.SIGNALS:
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.signum = signum


LOCK_NAME = ".writer.lock"


class RunLock:
    """The one-writer lock on a run folder: an exclusive flock on {folder}/.writer.lock, which holds the
    writer's PID, host, start time and command line. It is the OS's lock, so it ends with the process (a
    crash or SIGKILL included) and none is ever left behind; release() ends it sooner. A second writer gets a
    UserError naming the holder and `advice`, and changes nothing in the folder. Readers take no lock: every
    file in a run is replaced whole (atomic_write), so they never see half of one."""

    def __init__(self, folder, advice, option=""):
        try:
            os.makedirs(folder, exist_ok=True)
            self.file = open(os.path.join(folder, LOCK_NAME), "a+")  # a+ creates, and never truncates
        except OSError as e:
            raise unwritable(folder, option, e) from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read()
            self.file.close()
            raise UserError(f"{folder} is being written by another process ({describe_holder(holder)}); "
                            f"a run folder has one writer at a time: {advice}") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: some network filesystems have no working locks
            self.file.close()
            self.file = None
            print(f"warning: {folder} has no working file locks ({e.strerror}); nothing stops a "
                  "second process from writing this run at the same time", file=sys.stderr)
            return
        self.file.seek(0)
        self.file.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                   "command": " ".join(sys.argv)[:500]}, self.file)
        self.file.flush()

    @classmethod
    def attempt(cls, folder, advice, option=""):
        """(the lock, "") or (None, the refusal's line), for a caller that must share the refusal first."""
        try:
            return cls(folder, advice, option), ""
        except UserError as e:
            return None, str(e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the file ends the lock
            self.file = None


def describe_holder(text):
    """'PID 123 on host, since 2026-12-07 05:41:07: python train.py ...' from a lock file's JSON."""
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"PID {int(holder['pid'])} on {holder['host']}, since {started}: {str(holder['command'])[:80]}"
    except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its name
        return "a process that has just started"
