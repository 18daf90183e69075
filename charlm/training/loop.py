"""The training loop: step, evaluate, save, emit events. Everything it starts from is built by setup.py.

No host sync on the fast path: a non-finite loss or gradient is skipped by the fused optimizer
itself, and the losses are read back every log_every steps. Under torchrun every rank runs this
loop; rank 0's decisions (stop, save) are broadcast so that all ranks take the same branch.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import replace

import torch

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..device import ThreadTuner, autocast, rng_state
from ..errors import TrainingError
from ..evaluate import Metrics, evaluate
from ..model import State
from ..run_state import RunState
from ..streams import nll_sum
from .clock import Clock
from .events import Evaluated, EventSink, Note, Stepped, TrainResult
from .metrics_log import MetricsLog, loss_record, metrics_summary
from .optim import optimizer_tensors
from .schedule import learning_rate
from .setup import DevicePlan, Learner, Origin, RunData
from .stop import StopRequest, graceful_stop

MAX_BAD_STEPS = 10  # consecutive non-finite steps before training gives up
STOP_CODES = ["", "steps", "epochs", "time", "patience", "interrupted"]


class Loop:
    """One session of a run. `state` (with the weights, optimizer, RNG and `hidden`) is what a
    checkpoint holds, so a resumed run continues exactly; the rest is this session's bookkeeping."""

    def __init__(
        self,
        *,
        config: TrainConfig,
        devices: DevicePlan,
        data: RunData,
        learner: Learner,
        state: RunState,
        hidden: State,
        origin: Origin,
        header: dict,
        eval_every: int,
        emit: EventSink,
        log: MetricsLog | None,
    ) -> None:
        self.config, self.data, self.learner, self.origin = config, data, learner, origin
        self.device, self.dist, self.precision = devices.device, devices.dist, devices.precision
        self.state = state
        self.hidden = hidden  # recurrent state, each [L, B, H]: carried from chunk to chunk
        self.header = header
        self.eval_every = eval_every
        self.emit = emit
        self.log = log
        self.clock = Clock(
            elapsed_before=state.elapsed, val_chars=len(data.val_ids), world=self.dist.world, budget=config.time
        )
        # since the last report, on the device (read back every log_every steps)
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_steps = 0
        self.bad_run = torch.zeros((), device=self.device)  # consecutive non-finite steps
        self.bad_steps = torch.zeros((), device=self.device)
        self.steps_in_epoch = data.batches.steps_in_epoch(state.epoch)
        self.last_val: Metrics | None = None
        self.tuner = ThreadTuner(self.device, config.threads)

    # --- where the run stands

    def epoch_float(self) -> float:
        return self.state.epoch + self.state.chunk / max(1, self.steps_in_epoch)

    def fraction(self) -> float | None:
        c, parts = self.config, []
        if c.steps:
            parts.append(self.state.step / c.steps)
        if c.epochs:
            parts.append(self.epoch_float() / c.epochs)
        if c.time:
            parts.append(self.clock.elapsed() / max(1e-9, c.time - self.clock.finish_reserve()))
        return min(1.0, max(parts)) if parts else None

    def current_lr(self) -> float:
        return learning_rate(
            self.config,
            step=self.state.step,
            fraction=self.fraction(),
            epoch=self.epoch_float(),
            plateau_scale=self.state.plateau_scale,
        )

    def budget_reached(self) -> str:
        c, st = self.config, self.state
        if c.steps is not None and st.step >= c.steps:
            return "steps"
        if c.epochs is not None and self.epoch_float() >= c.epochs:
            return "epochs"
        if c.time is not None and self.clock.elapsed() + self.clock.finish_reserve() >= c.time:
            return "time"
        if c.patience and st.evals_since_best >= c.patience and (c.time is None or self.rate_at_floor()):
            return "patience"
        return ""

    def rate_at_floor(self) -> bool:
        """Whether stalling validation can still lower the rate: with a time budget, --patience
        stops a run only once it cannot (the budget is the user's; the best checkpoint is kept)."""
        return self.state.plateau_scale <= self.config.lr_floor

    def final_eval_near(self) -> bool:
        """A periodic validation this close to the end of the time budget would be repeated by the
        final one within moments: skip it and train instead (one process only: under torchrun
        every rank must take the same branch)."""
        c = self.config
        return (
            c.time is not None
            and not self.dist.active
            and self.clock.elapsed() + 3 * self.clock.finish_reserve() >= c.time
        )

    # --- the work

    def step(self) -> None:
        """One optimizer step on the next chunk of every stream. No host sync on the fast path:
        a non-finite loss or gradient is skipped by the fused optimizer itself (found_inf)."""
        st, lr = self.state, self.current_lr()
        net, opt = self.learner.net, self.learner.opt
        for group in opt.param_groups:
            group["lr"] = lr
        x_np, y_np = self.data.batches.get(st.epoch, st.chunk)  # [global B, T] each
        x = torch.from_numpy(x_np[self.data.rows]).to(self.device, non_blocking=True)  # [B, T]
        y = torch.from_numpy(y_np[self.data.rows]).to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            logits, new_hidden = self.learner.forward(x, self.hidden)  # [B, T, V]
        loss = nll_sum(logits, y) / y.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        params = [p for p in net.parameters() if p.grad is not None]
        if self.config.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
        if opt.defaults.get("fused"):
            opt.found_inf = bad.float()  # the fused kernel skips the update (and the step count)
            opt.step()
        elif not bool(bad):
            opt.step()
        self.learner.fade_prior(st.step)
        if self.learner.average is not None:
            self.learner.average.update()  # a skipped step leaves the weights, so averaging them again is harmless
        self.hidden = tuple(
            torch.where(bad, old.to(new.dtype), new.detach()) for old, new in zip(self.hidden, new_hidden, strict=True)
        )
        self.loss_sum += torch.where(bad, 0.0, loss.detach())
        self.bad_run = (self.bad_run + 1) * bad
        self.bad_steps += bad
        self.loss_steps += 1
        st.step += 1
        st.chunk += 1
        st.chars += x_np.size
        self.clock.session_chars += x_np.size
        self.clock.session_steps += 1
        if st.chunk >= self.steps_in_epoch:
            st.epoch += 1
            st.chunk = 0
            self.steps_in_epoch = self.data.batches.steps_in_epoch(st.epoch)
            self.hidden = net.initial_state(self.config.batch_size, self.device)
        report = st.step % self.config.log_every == 0
        if report:
            self.report(lr)
        self.emit(
            Stepped(
                step=st.step,
                epoch=self.epoch_float(),
                chars=st.chars,
                elapsed_s=self.clock.elapsed(),
                fraction=self.fraction(),
                lr=lr,
                train_loss=st.train_loss if report else None,
                chars_per_sec=self.clock.chars_per_sec(),
            )
        )

    def report(self, lr: float) -> None:
        """Every log_every steps: the one host sync, the training loss, and the divergence check."""
        st = self.state
        n_bad = int(self.bad_steps.item())
        has_loss = self.loss_steps > n_bad  # a window of only skipped steps has no loss to report
        if has_loss:
            st.train_loss = float(self.dist.sum(self.loss_sum).item()) / self.dist.world / (self.loss_steps - n_bad)
        if n_bad:
            st.skipped += n_bad
            self.emit(Note(f"skipped {n_bad} step(s) with a non-finite loss or gradient (total {st.skipped})"))
        self.loss_sum.zero_()
        self.bad_steps.zero_()
        self.loss_steps = 0
        if int(self.bad_run.item()) >= MAX_BAD_STEPS:
            raise TrainingError(
                f"the loss or gradients were not finite for {MAX_BAD_STEPS} steps in a row (step {st.step}); "
                "the last good checkpoint is kept",
                f"lower --lr (now {self.config.lr:g}) or --clip (now {self.config.clip:g}), or try --precision fp32",
            )
        if self.log and has_loss:
            self.log.write(
                {
                    **self._where("train"),
                    "lr": lr,
                    **loss_record("train", st.train_loss),  # type: ignore[arg-type] - has_loss
                    "chars_per_sec": self.clock.chars_per_sec(),
                }
            )

    def _where(self, event: str) -> dict:
        """The head of every metrics-log record: what happened, and where in the run."""
        st = self.state
        return {
            "event": event,
            "step": st.step,
            "epoch": round(self.epoch_float(), 5),
            "chars": st.chars,
            "elapsed_s": round(self.clock.elapsed(), 3),
        }

    def evaluate(self) -> None:
        st, began = self.state, time.perf_counter()
        vocab = self.data.corpus.vocab
        metrics = evaluate(
            self.learner.scored,
            self.data.val_ids,
            start_id=vocab.start_id,
            batch_size=self.config.eval_batch_size,
            device=self.device,
            precision=self.precision,
            dist=self.dist,
            fold=vocab.fold_penalty,
            tuner=self.tuner,
        )
        self.clock.eval_speed = len(self.data.val_ids) / self.dist.world / max(1e-9, time.perf_counter() - began)
        self.last_val = metrics
        st.last_eval_step = st.step
        improved = st.evaluated(metrics.cross_entropy, self.config)
        self.clock.non_train_time += time.perf_counter() - began
        if self.log:
            self.log.write(
                {
                    **self._where("eval"),
                    "lr": self.current_lr(),
                    **loss_record("val", metrics.cross_entropy),
                    **({} if st.train_loss is None else loss_record("train", st.train_loss)),
                }
            )
        if improved:
            self.save("best")
        self.save("last")
        self.emit(
            Evaluated(
                step=st.step,
                val=metrics,
                train_loss=st.train_loss,
                best=improved,
                best_val=st.best_val,
                evals_since_best=st.evals_since_best,
            )
        )

    def save(self, kind: str) -> None:
        """Rank 0 writes; under torchrun every rank must call this (the recurrent state is gathered)."""
        began = time.perf_counter()
        hidden = [self.dist.gather_rows(s) for s in self.hidden] if kind == "last" else []  # each [L, global B, H]
        if self.dist.is_main:
            meta = {
                **self.header,
                "kind": kind,
                "state": replace(self.state, elapsed=self.clock.elapsed()).to_dict(),
                "metrics": metrics_summary(self.state, self.last_val),
            }
            tensors = ckpt.model_tensors(self.learner.net if kind == "last" else self.learner.scored)
            if kind == "last":
                if self.learner.average is not None:
                    tensors.update(self.learner.average.tensors())
                opt_tensors, groups = optimizer_tensors(self.learner.opt)
                meta["state"]["optim_groups"] = groups
                tensors.update(opt_tensors)
                tensors.update({f"rng.{k}": v for k, v in rng_state(self.device).items()})
                tensors.update({f"hidden.{i}": s for i, s in enumerate(hidden)})
            ckpt.write(self.origin.best_path if kind == "best" else self.origin.last_path, tensors, meta)
        if kind == "last":
            self.clock.last_save = time.perf_counter()
        self.clock.save_s = max(self.clock.save_s, time.perf_counter() - began)
        self.clock.non_train_time += time.perf_counter() - began

    def run(self) -> TrainResult:
        """Step until a budget is reached or a stop is asked for; validate at the end; report."""
        stopped = ""
        stop_requested = StopRequest()
        try:
            with graceful_stop() as stop_requested:
                while True:
                    stopped = "interrupted" if stop_requested.is_set() else self.budget_reached()
                    save_due = time.perf_counter() - self.clock.last_save >= self.config.save_every
                    code = self.dist.decide(STOP_CODES.index(stopped) * 2 + save_due, self.device)
                    stopped, save_due = STOP_CODES[code // 2], bool(code % 2)
                    if stopped:
                        break
                    if save_due and self.state.step % self.eval_every:
                        self.save("last")
                    with self.tuner.unit(self.config.batch_size * self.config.seq_len):
                        self.step()
                    if self.state.step % self.eval_every == 0 and not self.final_eval_near():
                        self.evaluate()
                if self.state.last_eval_step != self.state.step:
                    self.evaluate()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keeping the work done so far
            stopped = "interrupted"
            stop_requested.signal = stop_requested.signal or signal.SIGINT
            if not self.dist.active:
                self.save("last")
        finally:
            self.tuner.close()
            if self.log:
                self.log.close()
        return self.result(stopped, stop_requested)

    def result(self, stopped: str, stop: StopRequest) -> TrainResult:
        st = self.state
        if not math.isfinite(st.best_val):
            raise TrainingError(
                "training stopped before the first evaluation, so no checkpoint was written", "train for longer"
            )
        return TrainResult(
            checkpoint=self.origin.best_path,
            last_checkpoint=self.origin.last_path,
            metrics_log=self.origin.metrics_path,
            steps=st.step,
            epochs=self.epoch_float(),
            params=self.learner.params,
            train_loss=st.train_loss,
            val_loss=st.best_val,
            best_step=st.best_step,
            chars_per_sec=self.clock.chars_per_sec(),
            elapsed_s=self.clock.elapsed(),
            stopped=stopped,
            skipped_steps=st.skipped,
            signal=int(stop.signal or signal.SIGINT) if stopped == "interrupted" else None,
            threads=self.tuner.threads,
        )
