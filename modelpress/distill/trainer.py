"""The trainer: one loop for every training stage, on Hugging Face ``accelerate``.

The same code runs on one CPU, on several processes (DDP: gloo on CPU, NCCL on GPUs; started with
``accelerate launch`` or ``torchrun``) and under FSDP when accelerate is configured for it; no
hand-written distributed plumbing. It gives gradient accumulation, mixed precision where the
device has it, a cosine / linear schedule with warm-up, gradient clipping, a budget in optimizer
steps, tokens or minutes, evaluation every N steps, a ``rich`` progress bar with the loss and
tokens/s, and checkpoints that resume to the same result after a kill.

Determinism: the samples of optimizer step ``k`` are a pure function of the seed and ``k`` (a
fixed permutation per epoch), the global batch is split across processes, and a checkpoint holds
the model, optimizer, schedule and RNG states. So a resumed run ends with the weights of an
uninterrupted one, and N processes see exactly the samples one process sees with the same global
batch. A checkpoint whose signature (recipe, data, code) differs is not resumed but redone.

Example:
    >>> trainer = Trainer(model, step_loss, TrainData(ids), TrainConfig(steps=100), workdir="run")  # doctest: +SKIP
    >>> result = trainer.train()                                                                    # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ..core.config import Config
from ..core.errors import ModelpressError
from ..core.progress import progress_enabled
from ..quant.fake import pack_after_training, unpack_for_training
from .losses import Batch

#: (the model being trained, a batch) -> (loss to minimise, number of tokens it covered)
StepLoss = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


class TrainHooks(Protocol):
    """Per-step callbacks of a stage that changes the model while it trains (a pruning schedule
    tightening masks, movement scores accumulated from gradients, a rewind point recorded).

    ``step`` is the 1-based number of the optimizer step: ``on_gradients`` sees its complete
    (accumulated, synchronised, unclipped) gradients before the update, ``on_step`` runs after it.
    ``state_dict`` / ``load_state_dict`` ride in the trainer's checkpoint, so a resumed run continues
    the hook where the killed one left it.
    """

    def on_gradients(self, step: int, model: nn.Module) -> None: ...

    def on_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainConfig(Config):
    """How to train: the budget, the batch, the optimiser and its schedule, checkpoints.

    ``batch_size`` is the global number of sequences per optimizer step, split across processes
    and ``grad_accum`` micro-steps. The budget is ``steps``, ``tokens`` (converted to steps) or
    ``minutes`` (wall clock; needs the constant schedule since the length is unknown).
    """

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    clip: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    activation_checkpointing: bool = Field(
        False, description="keep only each decoder block's input and recompute its activations in the backward "
                           "pass (Hugging Face models): about a third more compute for a fraction of the memory")
    eval_every: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _budget(self) -> "TrainConfig":
        if self.steps is None and self.tokens is None and self.minutes is None:
            raise ValueError("a training budget is needed: steps, tokens or minutes")
        if self.steps is None and self.tokens is None and self.schedule != "constant":
            raise ValueError(f"a {self.schedule} schedule needs its length: give steps or tokens (or schedule: constant)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        return self

    def total_steps(self, seq_len: int) -> int | None:
        """Optimizer steps the budget allows (None: minutes only)."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, self.tokens // (self.batch_size * seq_len))
        return None


@dataclass
class TrainData:
    """Training sequences: ids (N, L), optional mask of real tokens (N, L) and aligned labels (N, L);
    ``source``: the text they were cut from, when known (a stage may read its documents again)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source: str | None = None
    #: right-padded sequences (sentences padded to a common length): a batch drops the trailing
    #: columns that are padding in all its rows, so a 16-token sentence padded to 256 costs 16, not 256
    trim_padding: bool = False

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise ModelpressError(f"training data must be (sequences, length) with at least one sequence, "
                                  f"got shape {tuple(self.input_ids.shape)}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, idx: torch.Tensor) -> Batch:
        """The sequences ``idx`` (their indices ride along in ``extra["index"]`` for cached teachers)."""
        width = self._width(idx)
        pick = lambda t: None if t is None else t[idx, :width]  # noqa: E731
        return Batch(pick(self.input_ids), pick(self.attention_mask), pick(self.labels), {"index": idx})

    def _width(self, idx: torch.Tensor) -> int:
        """Columns a batch needs: all of them, or up to its last real token when trimming padding."""
        if not self.trim_padding or self.attention_mask is None:
            return int(self.input_ids.shape[1])
        real = self.attention_mask[idx].bool().any(0).nonzero()  # (columns holding a real token, 1)
        return int(real.max()) + 1 if real.numel() else 1

    def tokens(self, idx: torch.Tensor) -> int:
        return int(self.attention_mask[idx].sum()) if self.attention_mask is not None else int(idx.numel() * self.input_ids.shape[1])


@dataclass
class TrainResult:
    """What a training run did: steps, tokens, time, and the loss / evaluation curves."""

    steps: int
    tokens: int
    wall_s: float
    cpu_s: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last log)
    evals: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    resumed_from: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "tokens_per_s": self.tokens / self.wall_s if self.wall_s else None, "losses": self.losses,
                "evals": self.evals, "resumed_from": self.resumed_from, "world_size": self.world_size}


#: attribute a stage sets on a parameter that learns at its own peak rate (movement scores at 1e-2 beside
#: weights at 3e-5): an optimizer group of its own, under the same schedule and the same clip
OWN_LR = "modelpress_lr"


def own_lr(param: nn.Parameter, lr: float) -> nn.Parameter:
    """Mark ``param`` to train at peak rate ``lr`` instead of the config's. A separate group, not a
    rescaled parameter: rescaling (``S = c * raw``) multiplies its gradient by ``c`` too, and then it
    dominates the global norm that clipping divides every gradient by."""
    setattr(param, OWN_LR, float(lr))
    return param


def param_groups(params: list[nn.Parameter], cfg: "TrainConfig") -> list[dict[str, Any]]:
    """AdamW's groups: matrices with weight decay, vectors without (these two always, so a checkpoint's
    optimizer state lines up), then one group per marked rate, without decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    own: dict[float, list[nn.Parameter]] = {}
    for p in params:
        lr = getattr(p, OWN_LR, None)
        if lr is not None:
            own.setdefault(lr, []).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            *({"params": ps, "lr": lr, "weight_decay": 0.0} for lr, ps in own.items())]


def sample_order(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the ``batch`` samples of optimizer step ``step``: consecutive slices of one seeded
    permutation per epoch (a pure function of the arguments, so resuming needs only the step)."""
    per_epoch = max(1, n // batch)  # whole batches per epoch; the remainder waits for the next epoch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[pos * batch:(pos + 1) * batch]


def lr_lambda(schedule: str, total: int | None, warmup_frac: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``s``: linear warm-up, then cosine or
    linear decay to zero at ``total`` (constant after warm-up without a length)."""
    warm = int(round(warmup_frac * total)) if total else 0

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if schedule == "constant" or not total:
            return 1.0
        frac = min(1.0, (s - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac

    return f


def _checkpoint_activations(model: nn.Module) -> list[nn.Module]:
    """Turn on activation checkpointing in every outermost Hugging Face model inside ``model`` (the
    student, not a wrapper's loss modules); refused when there is none that supports it."""
    found: list[nn.Module] = []
    inside: set[int] = set()  # modules of a model already switched on (modules() lists outer ones first)
    for m in model.modules():
        if id(m) in inside:
            continue
        if getattr(m, "supports_gradient_checkpointing", False) and hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if getattr(getattr(m, "config", None), "use_cache", False):
                m.config.use_cache = False  # a KV cache is never read in training; transformers would warn
            found.append(m)
            inside.update(id(x) for x in m.modules())
    if not found:
        raise ModelpressError(f"train.activation_checkpointing: {type(model).__name__} holds no Hugging Face model "
                              "that supports it; set it to false")
    return found


class Trainer:
    """Runs the optimisation of ``model`` on ``step_loss`` (see the module docstring)."""

    def __init__(self, model: nn.Module, step_loss: StepLoss, data: TrainData, cfg: TrainConfig, *,
                 workdir: str | Path | None = None, signature: dict[str, Any] | None = None,
                 eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None, progress: bool = True,
                 description: str = "training", hooks: TrainHooks | None = None,
                 train_quantised: bool = True) -> None:
        """``train_quantised=False`` keeps quantised layers packed and frozen: adapters train around
        them (QLoRA), and gradients flow through the dequantised base matmul only."""
        from accelerate import Accelerator

        self.cfg, self.data, self.step_loss, self.eval_fn = cfg, data, step_loss, eval_fn
        self.hooks = hooks
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                       mixed_precision=cfg.mixed_precision if _has_accelerator() else "no",
                                       cpu=not _has_accelerator())
        world = self.accelerator.num_processes
        if cfg.batch_size % (cfg.grad_accum * world):
            raise ModelpressError(f"batch_size {cfg.batch_size} must split evenly over {cfg.grad_accum} micro-steps "
                                  f"x {world} processes")
        if len(data) < cfg.batch_size:
            raise ModelpressError(f"training data holds {len(data)} sequences, fewer than one batch of {cfg.batch_size}")
        self.total = cfg.total_steps(int(data.input_ids.shape[1]))
        self.workdir = Path(workdir) if workdir else None
        self.signature = {**(signature or {}), "train": cfg.to_dict(), "world_size": world,
                          "data": _digest(data.input_ids)}
        self.description, self.progress = description, progress and progress_enabled()
        # quantised layers train through their fake-quantised form, packed back when training ends
        self.fake_quantised = unpack_for_training(model) if train_quantised else 0
        self.checkpointed = _checkpoint_activations(model) if cfg.activation_checkpointing else []
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ModelpressError("nothing to train: the model has no trainable parameters")
        # the fused kernel: torch's default on CPU is a per-tensor loop, several times slower (MiniLM-L6's
        # 17M parameters: 0.26 s vs 0.02 s a step; SmolLM2-135M: ~1 s vs ~0.2 s)
        opt = torch.optim.AdamW(param_groups(params, cfg), lr=cfg.lr, betas=cfg.betas,
                                fused=all(p.is_floating_point() for p in params) or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, self.total, cfg.warmup))
        # the schedule is stepped here, once per optimizer step: accelerate's wrapper would step it once
        # per process (it assumes each process sees 1/N of the batches), racing the warm-up under DDP
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.scheduler = sched
        self.accelerator.register_for_checkpointing(sched)
        self.raw_model = model

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train to the budget (resuming from a matching checkpoint); returns the curves."""
        acc, cfg = self.accelerator, self.cfg
        start, tokens, losses, evals = self._resume()
        t0, c0 = time.perf_counter(), time.process_time()
        micro = cfg.batch_size // (cfg.grad_accum * acc.num_processes)
        self.model.train()
        step, run_loss, run_n = start, 0.0, 0
        with self._bar(start) as bar:
            while not self._done(step, t0):
                idx = sample_order(len(self.data), step, cfg.batch_size, cfg.seed)
                mine = idx.view(cfg.grad_accum, acc.num_processes, micro)[:, acc.process_index]  # (accum, micro)
                for m in mine:
                    with acc.accumulate(self.model):
                        loss, _ = self.step_loss(self.model, self.data.batch(m).to(acc.device))
                        acc.backward(loss)
                        if acc.sync_gradients and self.hooks is not None:
                            self.hooks.on_gradients(step + 1, self.raw_model)
                        if acc.sync_gradients and cfg.clip is not None:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.clip)
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    run_loss += float(loss.detach()) / cfg.grad_accum
                step += 1
                if self.hooks is not None:
                    self.hooks.on_step(step, self.raw_model, self.optimizer)
                tokens += self.data.tokens(idx)
                run_n += 1
                if step % cfg.log_every == 0 or self._done(step, t0):
                    losses.append((step, self._mean_over_processes(run_loss / run_n)))
                    run_loss, run_n = 0.0, 0
                if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_fn is not None:
                    evals.append((step, self._evaluate()))
                if self.workdir is not None and step % cfg.checkpoint_every == 0:
                    self._checkpoint(step, tokens, losses, evals)
                bar(step, tokens, losses[-1][1] if losses else float(loss.detach()), t0)
        self.model.eval()
        acc.wait_for_everyone()
        self._clear_checkpoint()
        for m in self.checkpointed:
            m.gradient_checkpointing_disable()
        if self.fake_quantised:
            pack_after_training(self.raw_model)
        return TrainResult(step, tokens, time.perf_counter() - t0, time.process_time() - c0, losses, evals,
                           start, acc.num_processes)

    def unwrapped(self) -> nn.Module:
        """The trained model without its distributed wrapper."""
        return self.accelerator.unwrap_model(self.model)

    def _done(self, step: int, t0: float) -> bool:
        if self.total is not None and step >= self.total:
            return True
        if self.cfg.minutes is None:
            return False
        late = torch.tensor(float(time.perf_counter() - t0 >= 60 * self.cfg.minutes), device=self.accelerator.device)
        return bool(self.accelerator.reduce(late, reduction="sum") > 0)  # every process stops together

    def _mean_over_processes(self, v: float) -> float:
        t = torch.tensor(v, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="mean"))

    def _evaluate(self) -> dict[str, Any]:
        self.model.eval()
        with torch.no_grad():
            res = self.eval_fn(self.unwrapped())
        self.model.train()
        return res

    # ---- checkpoints -------------------------------------------------------------------------------
    def _ckpt(self) -> Path:
        return self.workdir / "train-checkpoint"

    def _resume(self) -> tuple[int, int, list, list]:
        if self.workdir is None:
            return 0, 0, [], []
        meta = self._ckpt() / "trainer.json"
        if not meta.exists():
            return 0, 0, [], []
        state = json.loads(meta.read_text())
        if state.get("signature") != json.loads(json.dumps(self.signature, default=str)):
            self._clear_checkpoint()  # another recipe, other data or other code: redo, never splice
            return 0, 0, [], []
        self.accelerator.load_state(str(self._ckpt()))
        if self.hooks is not None:
            self.hooks.load_state_dict(torch.load(self._ckpt() / "hooks.pt", weights_only=True))
        return state["step"], state["tokens"], [tuple(x) for x in state["losses"]], [tuple(x) for x in state["evals"]]

    def _checkpoint(self, step: int, tokens: int, losses: list, evals: list) -> None:
        """Model, optimizer, schedule and RNG states, written beside and then renamed over the last."""
        acc = self.accelerator
        tmp = self.workdir / "train-checkpoint.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps({"signature": self.signature, "step": step, "tokens": tokens,
                                                          "losses": losses, "evals": evals}, default=str))
            if self.hooks is not None:
                torch.save(self.hooks.state_dict(), tmp / "hooks.pt")
            old = self.workdir / "train-checkpoint.old"
            if self._ckpt().exists():
                os.replace(self._ckpt(), old)
            os.replace(tmp, self._ckpt())
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _clear_checkpoint(self) -> None:
        if self.workdir is not None and self.accelerator.is_main_process:
            for name in ("train-checkpoint", "train-checkpoint.tmp", "train-checkpoint.old"):
                shutil.rmtree(self.workdir / name, ignore_errors=True)

    # ---- progress ----------------------------------------------------------------------------------
    def _bar(self, start: int) -> Any:
        """A context giving ``update(step, tokens, loss, t0)``: a rich bar on the main process."""
        import contextlib

        if not (self.progress and self.accelerator.is_main_process):
            return contextlib.nullcontext(lambda *a: None)
        return _RichBar(self.description, self.total, start)


class _RichBar:
    def __init__(self, description: str, total: int | None, start: int) -> None:
        import sys

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                             TimeElapsedColumn(), console=Console(file=sys.stderr))
        self.task = self.prog.add_task(description, total=total, completed=start, loss=float("nan"), tps=0.0)
        self.start_tokens: int | None = None

    def __enter__(self) -> Callable[..., None]:
        self.prog.__enter__()
        return self.update

    def __exit__(self, *exc: Any) -> None:
        self.prog.__exit__(*exc)

    def update(self, step: int, tokens: int, loss: float, t0: float) -> None:
        if self.start_tokens is None:
            self.start_tokens = tokens
        tps = (tokens - self.start_tokens) / max(1e-9, time.perf_counter() - t0)
        self.prog.update(self.task, completed=step, loss=loss, tps=tps)


def _has_accelerator() -> bool:
    return torch.cuda.is_available()


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
