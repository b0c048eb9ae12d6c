"""core/devices.resolve_device and core/atomic: the machine's and the file system's refusals as one-line errors."""

import errno
import os
import stat
import tempfile

import pytest
import torch

from modsquad.core.atomic import atomic_write, staging_dir
from modsquad.core.devices import resolve_device
from modsquad.core.errors import ConfigError, OutputPathError


def test_resolve_device_names_what_this_machine_lacks():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="unknown device 'bogus'"):
        resolve_device("bogus")
    with pytest.raises(ConfigError, match="not meta"):
        resolve_device("meta")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="cuda:99"):
        resolve_device("cuda:99")
    if count == 0:
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="MPS is not available"):
            resolve_device("mps")


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_disk_is_an_error_naming_the_output(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputPathError, match=f"cannot write {tmp_path / 'x.json'}: {os.strerror(code)}"):
        atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    with pytest.raises(OutputPathError, match="cannot write"):
        with staging_dir(tmp_path / "out"):
            pass


def test_a_full_disk_while_writing_names_the_output_and_leaves_nothing(tmp_path):
    def write(p):
        p.write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputPathError, match="No space left"):
        atomic_write(tmp_path / "x.json", write)
    assert list(tmp_path.iterdir()) == []


def test_run_checkpoints_get_the_usual_file_mode(tmp_path):
    from safetensors.torch import save_file

    from modsquad.checkpoint import commit_run_checkpoint

    final = commit_run_checkpoint(tmp_path, {"last.safetensors": lambda p: save_file({"w": torch.zeros(1)}, str(p))})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(final / "last.safetensors").st_mode) == 0o666 & ~umask
