"""Where the arithmetic of the similarity pass and of merging runs: the CPU or a CUDA device.

Checkpoints are always read into host memory; each chunk of task vectors is moved to the
device (`to_device`), transformed and merged there, and a group's result comes back to the
host (`to_host`) before it is cast to the storage dtype and written. On the CPU both moves are
`Tensor.to` onto the tensor's own device, which returns the tensor itself: no copy, the same
bits as before the option existed. Every tensor a method or a transform creates takes the
device of the tensors it works on, so nothing else has to know which device was chosen.
"""

from __future__ import annotations

import torch

from flexmerge.errors import ConfigError

CPU = torch.device("cpu")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(spec: str | torch.device | None = None, executor=None) -> torch.device:
    """The device a `--device` value names: None and "cpu" are the CPU, "auto" CUDA when
    `torch.cuda.is_available()` (else the CPU), "cuda" / "cuda:N" that GPU, which must exist.

    Ray workers are separate processes that Ray gives no GPU unless a task asks for one, so
    with the Ray executor "auto" is the CPU and an explicit CUDA device is refused."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "cpu" if spec is None else str(spec).strip().lower()
    on_ray = getattr(executor, "name", executor) == "ray"
    if text == "auto":
        return CPU if on_ray or not torch.cuda.is_available() else torch.device("cuda", torch.cuda.current_device())
    if text == "cpu":
        return CPU
    kind, colon, index = text.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ConfigError(f"unknown device {spec!r} (--device); choose one of: {', '.join(DEVICES)}")
    if on_ray:
        raise ConfigError(f"device {spec!r} (--device) is not supported with the Ray executor (its workers get "
                          "no GPU); use --device cpu with --executor ray, or --executor local/threads on the GPU")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} (--device) asked for, but CUDA is not available here "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                          "use --device cpu or auto")
    count = torch.cuda.device_count()
    n = int(index) if colon else torch.cuda.current_device()
    if n >= count:
        raise ConfigError(f"device {spec!r} (--device) does not exist: this machine has {count} CUDA "
                          f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", n)


def to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """`t` on `device` (None: where it is). The one place chunks go to the device."""
    return t if device is None else _move(t, device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory: the one place results come back from the device."""
    return _move(t, CPU)


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:  # tests wrap it to count the moves
    # blocking: the host chunk is a reused buffer (see `_scratch`), refilled right after the move
    return t.to(device)
