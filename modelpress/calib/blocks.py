"""The calibration activation cache: one decoder block's cached inputs, replayed under hooks.

:func:`capture_first_block_inputs` runs the calibration ids up to block 0 and keeps what it receives
(hidden states plus the keyword arguments: masks, rotary tables); :class:`BlockInputs` replays them
through a block (hooks observe) and replaces them by the block's outputs, the next block's inputs.
The cache may live in a memory-mapped file so its pages can leave RAM.

A submodule whose output is already known for every cached batch (:class:`KnownOutputs`: the
attention once its last layer is quantised, from that layer's recorded inputs) is not run again:
while the cache replays the block, that submodule returns the known output instead.
"""
from __future__ import annotations

import itertools
import mmap
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.threads import matmul_precision
from ..models.archspec import get_blocks
from ..models.loading import LoadedModel
from ..models.mapped import page_out


#: Spill file numbering (unique within the process).
_SPILLS = itertools.count()


class _Stop(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


#: Tokens per block forward: ~4k keeps the calls few; with the cache on disk (low memory) half
#: that, since a forward's temporaries (the MLP's four (tokens, intermediate) tensors) then
#: dominate what is left in RAM.
FORWARD_TOKENS, FORWARD_TOKENS_ON_DISK = 4096, 2048


class MappedFile:
    """A file mapped shared into memory whose pages are handed back to the OS once used.

    Pages written through a shared mapping stay resident (and count in the process's RSS) until
    unmapped; ``release`` drops a byte range from the mapping with ``MADV_DONTNEED``, which keeps
    the data (the page cache holds it, and writes it to the file) and reads it back on next use.
    :meth:`write` goes through ``pwrite`` instead: the page cache is coherent with the mapping, and
    no page of this process is faulted in (measured 5-10x faster than copying into the mapping).
    """

    def __init__(self, path: str, nbytes: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, nbytes)
        self.mm = mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def grow(self, nbytes: int) -> None:
        """At least ``nbytes`` long (never shrinks: blocks the file already has stay allocated)."""
        if nbytes > len(self.mm):
            self.mm.close()
            os.ftruncate(self.fd, nbytes)
            self.mm = mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def write(self, offset: int, t: torch.Tensor) -> None:
        """Store ``t``'s bytes at ``offset`` without mapping them into this process."""
        data = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return torch.frombuffer(self.mm, dtype=dtype, count=n).view(shape)

    def release(self, start: int, stop: int) -> None:
        """Drop bytes ``[start, stop)`` (widened to whole pages) from RAM; their data stays in the file."""
        page = mmap.PAGESIZE
        a, b = start // page * page, min(len(self.mm), -(-stop // page) * page)
        if b > a and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)


class Spill:
    """One tensor per cached batch, kept in a file-backed mapping instead of RAM (low memory).

    Why: replaying a submodule from its recorded inputs, or keeping a submodule's outputs, saves
    block forwards but holds a whole calibration set's activations; with the cache on disk those
    go to disk too. Each tensor is written once, read back as a view when used, and its pages are
    handed back to the OS right after (:meth:`MappedFile.release`). The file is sized from the first
    batch (the largest: only the last batch can be shorter) and removed when the spill is dropped,
    or, given a ``pool``, handed to the pool for the next spill: a file whose blocks the filesystem
    has already allocated is several times faster to write than a new one.
    """

    def __init__(self, path: str, n_batches: int, pool: list[MappedFile] | None = None) -> None:
        self.path, self.n, self.pool = path, n_batches, pool
        self.file: MappedFile | None = None
        self.slot = 0
        self.shapes: list[tuple[tuple[int, ...], torch.dtype] | None] = [None] * n_batches

    def __len__(self) -> int:
        return sum(m is not None for m in self.shapes)

    def __bool__(self) -> bool:  # a spill is a spill even before its first batch
        return True

    def put(self, b: int, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.file is None:
            self.slot = -(-nbytes // 64) * 64
            if self.pool:
                self.file = self.pool.pop()
                self.file.grow(self.slot * self.n)
            else:
                self.file = MappedFile(self.path, self.slot * self.n)
            if self.pool is not None:
                weakref.finalize(self, self.pool.append, self.file)
            else:
                weakref.finalize(self, _unlink, self.file.path)
        if nbytes > self.slot:
            raise ModelpressError(f"internal: batch {b} ({nbytes} bytes) is larger than the first ({self.slot})")
        self.file.write(b * self.slot, t)
        self.shapes[b] = (tuple(t.shape), t.dtype)

    def get(self, b: int) -> torch.Tensor:
        """Batch ``b``'s tensor: a view of the mapping (read it, then :meth:`release`)."""
        meta = self.shapes[b]
        if meta is None:
            raise ModelpressError(f"internal: spilled batch {b} was never written")
        return self._view(b, *meta)

    def release(self, b: int) -> None:
        if self.file is not None:
            self.file.release(b * self.slot, (b + 1) * self.slot)

    def _view(self, b: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return torch.frombuffer(self.file.mm, dtype=dtype, count=n, offset=b * self.slot).view(shape)


def _unlink_all(files: list[MappedFile]) -> None:
    for f in files:
        _unlink(f.path)
    files.clear()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass
class BlockInputs:
    """Cached inputs of the current block: ``hidden`` (n_samples, seq, d) and shared kwargs.

    ``hidden`` may be a memory-mapped tensor (offload to disk) so its pages can leave RAM.
    """

    hidden: torch.Tensor  # (n_samples, seq, hidden)
    kwargs: dict[str, Any]
    batch_size: int = 1  # samples per block forward; kwargs (masks, rotary tables) broadcast over it
    on_disk: bool = False  # hidden is a memory-mapped file: keep other activation copies out of RAM too
    #: submodules of the current block whose outputs are known (they return those instead of running);
    #: the engine clears it whenever a stage may change the block
    known: dict[nn.Module, "KnownOutputs"] = field(default_factory=dict)
    #: the file ``hidden`` is mapped from (on disk only): samples are released from RAM once used
    pages: MappedFile | None = None
    #: float32 matmul precision of this stream's forwards (and the statistics hooks inside them):
    #: "fp32" or "bf16" (:func:`~modelpress.core.threads.matmul_precision`)
    precision: str = "fp32"
    #: spill files of dropped spills, reused by the next ones (on disk only)
    _spill_pool: list[MappedFile] | None = field(default=None, repr=False)

    def batches(self) -> Iterator[torch.Tensor]:
        for s in range(0, self.hidden.shape[0], self.batch_size):
            yield self.hidden[s:s + self.batch_size]
            self.release(s, s + self.batch_size)

    def release(self, s: int, e: int) -> None:
        """Samples ``s:e`` of an on-disk cache leave RAM (no-op in RAM)."""
        if self.pages is not None:
            row = self.hidden[0].numel() * self.hidden.element_size()
            self.pages.release(s * row, min(e, self.hidden.shape[0]) * row)

    def store(self, s: int, x: torch.Tensor) -> None:
        """Overwrite samples ``s:s + len(x)`` (on disk: written past this process's RAM)."""
        if self.pages is None:
            self.hidden[s:s + x.shape[0]] = x
            return
        self.release(s, s + x.shape[0])  # drop the mapped pages read for this batch
        row = self.hidden[0].numel() * self.hidden.element_size()
        self.pages.write(s * row, x.to(self.hidden.dtype))

    def spill(self, tag: str) -> Spill | None:
        """A new per-batch spill file beside the on-disk cache (None when the cache is in RAM)."""
        if self.pages is None:
            return None
        if self._spill_pool is None:  # spill files are reused for this cache's lifetime, then removed
            self._spill_pool = []
            weakref.finalize(self, _unlink_all, self._spill_pool)
        return Spill(f"{self.pages.path}.{tag}{next(_SPILLS)}", self.n_batches, self._spill_pool)

    def forget_known(self) -> None:
        """Drop every known submodule output (the block is about to change)."""
        self.known.clear()

    @contextmanager
    def _substituted(self) -> Iterator[list[int]]:
        """While active, each known submodule returns its output for batch ``cursor[0]``."""
        cursor = [0]
        for module, known in self.known.items():
            module.forward = known.substitute(cursor)  # an instance attribute shadows the class's forward
        try:
            yield cursor
        finally:
            for module in self.known:
                module.__dict__.pop("forward", None)

    def run(self, block: nn.Module, stop_after: nn.Module | None = None, max_batches: int | None = None,
            *, stop_before: nn.Module | None = None, record: nn.Module | None = None) -> "SubInputs | None":
        """Forward every cached sample through ``block`` (hooks observe; outputs dropped).

        ``stop_before`` ends each forward when that submodule is called (after the input-capture
        pre-hooks registered earlier have seen its input); ``stop_after`` once it has run.
        ``max_batches`` limits the run to the first batches (a sample is enough for some searches).
        ``record`` keeps the inputs of that submodule, batch by batch, so a later observation
        that only needs its inside can replay it (:class:`SubInputs`) instead of the whole block;
        returns ``None`` when the forward stopped before reaching it.
        """
        handles = []
        calls: list[tuple[tuple, dict]] = []
        spill = self.spill("replay") if record is not None else None

        def keep(_m: nn.Module, a: tuple, kw: dict) -> None:
            args = tuple(t.detach() if torch.is_tensor(t) else t for t in a)
            if spill is not None and args and torch.is_tensor(args[0]):  # the hidden states go to disk
                spill.put(len(calls), args[0])
                args = (_SPILLED,) + args[1:]
            calls.append((args, dict(kw)))

        if record is not None:
            handles.append(record.register_forward_pre_hook(keep, with_kwargs=True))
        if stop_before is not None:
            handles.append(stop_before.register_forward_pre_hook(_raise_stop))
        if stop_after is not None:
            handles.append(stop_after.register_forward_hook(_raise_stop))
        n_batches = 0
        try:
            with self._substituted() as cursor, matmul_precision(self.precision):
                for b, x in enumerate(self.batches()):
                    if max_batches is not None and b >= max_batches:
                        break
                    n_batches += 1
                    cursor[0] = b
                    try:
                        block(x, **self.kwargs)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        return SubInputs(calls, spill, self.precision) if record is not None and len(calls) == n_batches else None

    def forward_batch(self, block: nn.Module, b: int, *, stop_before: nn.Module | None = None) -> None:
        """Forward batch ``b`` alone through ``block`` (hooks observe; the output is dropped), ending
        when ``stop_before`` is called. For passes that walk two streams in step, batch by batch."""
        s = b * self.batch_size
        handle = stop_before.register_forward_pre_hook(_raise_stop) if stop_before is not None else None
        try:
            with matmul_precision(self.precision):
                block(self.hidden[s:s + self.batch_size], **self.kwargs)
        except _Stop:
            pass
        finally:
            if handle is not None:
                handle.remove()

    @property
    def n_batches(self) -> int:
        return -(-self.hidden.shape[0] // self.batch_size)

    def outputs(self, block: nn.Module) -> torch.Tensor:
        """``block``'s outputs for every cached sample, (n_samples, seq, hidden); the cache is unchanged."""
        out = torch.empty_like(self.hidden)
        with self._substituted() as cursor, matmul_precision(self.precision):
            for b, s in enumerate(range(0, self.hidden.shape[0], self.batch_size)):
                cursor[0] = b
                y = block(self.hidden[s:s + self.batch_size], **self.kwargs)
                out[s:s + self.batch_size] = y[0] if isinstance(y, tuple) else y
                self.release(s, s + self.batch_size)
        return out

    def propagate(self, block: nn.Module) -> None:
        """Replace the cached inputs by ``block``'s outputs (inputs of the next block)."""
        with self._substituted() as cursor, matmul_precision(self.precision):
            for b, s in enumerate(range(0, self.hidden.shape[0], self.batch_size)):
                cursor[0] = b
                out = block(self.hidden[s:s + self.batch_size], **self.kwargs)
                self.store(s, out[0] if isinstance(out, tuple) else out)
        self.forget_known()  # they were this block's


@dataclass
class SubInputs:
    """Recorded inputs of one submodule of a block (e.g. the MLP), one call per cached batch.

    Replaying the submodule from these is exact as long as nothing *outside* it changed since
    they were recorded; the engine's callers only record a submodule that contains every layer
    they modify in between.
    """

    calls: list[tuple[tuple, dict]]
    spill: Spill | None = None  # low memory: each call's first argument is on disk (``_SPILLED`` marks it)
    precision: str = "fp32"  # the recording stream's matmul precision, kept on replay

    def args(self, k: int) -> tuple:
        """Call ``k``'s positional arguments (the spilled one read back)."""
        args = self.calls[k][0]
        return (self.spill.get(k),) + args[1:] if args and args[0] is _SPILLED else args

    def run(self, module: nn.Module, *, stop_before: nn.Module | None = None,
            check_last: nn.Module | None = None) -> Callable[[torch.Tensor], Any] | None:
        """Call ``module`` on every recorded input (hooks observe; outputs dropped).

        ``check_last`` (a layer inside ``module``, usually ``stop_before``): the first call runs to
        the end to see whether ``module`` returns exactly that layer's output (alone, or first in a
        tuple whose other items are None). If so the answer rebuilds ``module``'s return value
        around a tensor (see :class:`KnownOutputs`); otherwise it is None.
        """
        seen: dict[str, Any] = {}
        handles = []
        if check_last is not None:
            handles.append(check_last.register_forward_hook(lambda _m, _a, out: seen.setdefault("last", out)))
            handles.append(module.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out)))
        try:
            with matmul_precision(self.precision):
                for k, (_args, kwargs) in enumerate(self.calls):
                    if stop_before is not None and k == (check_last is not None):  # after the checked call
                        handles.append(stop_before.register_forward_pre_hook(_raise_stop))
                    try:
                        module(*self.args(k), **kwargs)
                    except _Stop:
                        pass
                    if self.spill is not None:
                        self.spill.release(k)
        finally:
            for h in handles:
                h.remove()
        return _rebuild_if_last(seen.get("out"), seen.get("last")) if check_last is not None else None

    def nbytes(self) -> int:
        """Bytes held in RAM (a spilled argument is on disk)."""
        return sum(t.numel() * t.element_size() for a, _ in self.calls for t in a if torch.is_tensor(t))


#: Marks a recorded argument that lives in the call list's spill file.
_SPILLED = object()


@dataclass
class KnownOutputs:
    """A submodule's output for every cached batch, known without running the submodule.

    Valid when the submodule returns its last layer's output (checked by :meth:`SubInputs.run`)
    and nothing inside it changes any more: its output for batch ``b`` is then ``last(inputs[b])``,
    one layer instead of the whole submodule (the attention once ``o_proj`` is quantised, the MLP
    once ``down_proj`` is). The layer is looked up by name at use (it may have been replaced by its
    compressed version), and each output, computed on first use, replaces the input kept for it.
    """

    parent: nn.Module  # the submodule whose forward is substituted
    last: str  # its last layer, relative to ``parent``
    #: per batch: the last layer's input, then its output once computed (in RAM, or a Spill on disk)
    values: list[torch.Tensor] | Spill
    rebuild: Callable[[torch.Tensor], Any]  # the submodule's return value around an output
    computed: list[bool] = field(default_factory=list)
    outputs: Spill | None = None  # low memory: the computed outputs (their shape may differ from the inputs')

    def output(self, b: int) -> Any:
        if not self.computed:
            self.computed = [False] * len(self.values)
        if isinstance(self.values, Spill):
            if not self.computed[b]:
                y = self.parent.get_submodule(self.last)(self.values.get(b))
                self.values.release(b)
                self.outputs.put(b, y)
                self.computed[b] = True
            y = self.outputs.get(b).clone()
            self.outputs.release(b)
            return self.rebuild(y)
        if not self.computed[b]:
            self.values[b] = self.parent.get_submodule(self.last)(self.values[b])
            self.computed[b] = True
        return self.rebuild(self.values[b].clone())  # a fresh tensor each call, as a real forward gives

    def substitute(self, cursor: list[int]) -> Callable[..., Any]:
        """A forward that ignores its arguments and returns the output of batch ``cursor[0]``."""
        return lambda *_a, **_kw: self.output(cursor[0])


def _rebuild_if_last(out: Any, last: Any) -> Callable[[torch.Tensor], Any] | None:
    """How to rebuild ``out`` around another tensor, when ``out`` is ``last`` (or ``(last, None, ...)``)."""
    if not torch.is_tensor(last):
        return None
    if out is last:
        return lambda y: y
    if isinstance(out, tuple) and out and out[0] is last and all(o is None for o in out[1:]):
        n = len(out)
        return lambda y: (y,) + (None,) * (n - 1)
    return None


def _raise_stop(*_: Any) -> None:
    raise _Stop


def common_ancestor(block: nn.Module, modules: Iterable[nn.Module]) -> nn.Module | None:
    """The deepest submodule of ``block`` (not ``block`` itself) that contains every one of ``modules``."""
    wanted = {id(m) for m in modules}
    best, best_depth = None, -1
    for name, m in block.named_modules():
        if not name:
            continue
        inside = {id(x) for x in m.modules()}
        depth = name.count(".")
        if wanted <= inside and depth > best_depth:
            best, best_depth = m, depth
    return best


def last_module(block: nn.Module, modules: Iterable[nn.Module]) -> nn.Module | None:
    """The one of ``modules`` registered last in ``block``: a forward can stop once it has run."""
    wanted = {id(m) for m in modules}
    last = None
    for m in block.modules():
        if id(m) in wanted:
            last = m
    return last


@torch.no_grad()
def capture_first_block_inputs(lm: LoadedModel, calib: torch.Tensor, offload: str | None = None) -> BlockInputs:
    """Run calibration ids up to block 0 and cache what it receives."""
    blocks = get_blocks(lm.module, lm.spec) if lm.spec else []
    if not blocks:
        raise ModelpressError("sequential calibration needs a known architecture (decoder blocks); "
                              f"{type(lm.module).__name__} has none: use a layer-wise method")
    store: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.pop("hidden_states")
        kwargs = dict(kwargs)
        kwargs.pop("hidden_states", None)
        store.setdefault("kwargs", kwargs)
        if "hidden" not in store:  # (n_samples, seq, d), allocated once the shape is known
            store["hidden"], store["pages"] = _allocate((calib.shape[0], *x.shape[1:]), x.dtype, offload, x.device)
        n = store.setdefault("n", 0)
        store["hidden"][n] = x[0].detach()
        if store["pages"] is not None:
            row = x[0].numel() * x.element_size()
            store["pages"].release(n * row, (n + 1) * row)
        store["n"] += 1
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    from ..core.progress import track

    try:
        device = next((p.device for p in lm.module.parameters() if not p.is_meta), torch.device("cpu"))
        for row in track(calib, "calibration inputs"):
            try:
                _call_model(lm.module, row[None].to(device))  # the ids go to the model, never the reverse
            except _Stop:
                pass
    finally:
        handle.remove()
    page_out()  # the embedding rows (mapped in low-memory mode) this pass read are not needed again
    hidden = store["hidden"]
    kwargs = {k: v for k, v in store["kwargs"].items() if k not in ("past_key_value", "past_key_values", "use_cache")}
    batch = max(1, (FORWARD_TOKENS if offload is None else FORWARD_TOKENS_ON_DISK) // hidden.shape[1])
    return BlockInputs(hidden, kwargs, batch_size=batch, on_disk=offload is not None, pages=store["pages"])


def _call_model(model: nn.Module, ids: torch.Tensor) -> Any:
    try:
        return model(input_ids=ids, use_cache=False)
    except TypeError:
        return model(ids)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, path: str | None,
              device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, MappedFile | None]:
    """A tensor on ``device``, or (CPU only) backed by a memory-mapped file at ``path`` (and that file)."""
    if path is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device), None
    n = dtype.itemsize
    for d in shape:
        n *= d
    pages = MappedFile(path, n)
    return pages.tensor(shape, dtype), pages
