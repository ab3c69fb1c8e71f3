"""The shared trainer: set-up, the train step, evaluation, checkpoints, the run directory.

Every arm of a sweep runs this same code; only its config differs. Factors act through
registries and the denoiser's block hooks, never through branches here.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from core.atomic import Unreadable
from core.records import EvalRecord, LogRow, Requeue, Result, Spec, Status, Throughput
from core.rundir import DONE, RUNNING, SUBMITTED, TRAINER_OVERWRITES, RunDir, now
from trainer import flow, generation, tracking
from trainer.config import DENOISER_FACTORS, TrainConfig
from trainer.data import cache
from trainer.data.datasets import StepBatchSampler
from trainer.factors import ema
from trainer.factors.contrastive import CONTRASTIVE
from trainer.factors.optimizer import OPTIMIZERS, lr_factor
from trainer.factors.precision import PRECISION
from trainer.model import Denoiser, FactorContext, build_prx
from trainer.runtime import checkpoint, parallel
from trainer.runtime.compile import compiled
from trainer.runtime.dist import Dist
from trainer.runtime.preempt import Preemption

VAL_SEED = 1234  # noise of the held-out set: fixed, equal across arms and seeds


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the arm stops as failed."""


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step): resumed and multi-process runs draw the same numbers."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass
class StepTimes:
    """Accumulated wall time between log lines, split into waiting for data and the rest."""

    data: float = 0.0
    total: float = 0.0
    steps: int = 0


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        dist: Dist,
        inputs: tuple | None = None,
        preemption: Preemption | None = None,
    ):
        """`inputs` = (inputs, train set, val set) replaces the configured encoders and data (benchmarks);
        `preemption` holds the stop signals caught so far (job.run installs it before this set-up)."""
        t0 = time.perf_counter()
        self.preemption = preemption if preemption is not None else Preemption()
        self.wandb = tracking.Tracker()
        self.cfg, self.rundir, self.dist, self.device = cfg, RunDir(run_dir), dist, dist.device
        self.spec = read_spec(self.rundir)
        if cfg.train.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)  # the denoiser's initial weights
        self.precision = PRECISION.build(cfg.precision, self.device)
        # latents and caption embeddings: encoded live each step, or read from the cache (cfg.cache)
        tokenizer_cache = cfg.eval.cache_dir or self.rundir.default_eval_cache  # domain-trained tokenizers
        self.inputs, self.train_set, self.val_set = inputs or cache.build_inputs(
            cfg, self.device, cfg.weights_dir, tokenizer_cache
        )
        prx = build_prx(cfg.model, cfg.tokenizer.channels, cfg.text_encoder.dim)
        sizes = cfg.model.sizes()
        ctx = FactorContext(
            hidden_size=sizes["hidden_size"],
            depth=sizes["depth"],
            patch_size=sizes["patch_size"],
            resolution=cfg.data.resolution,
            downsample=cfg.tokenizer.downsample,
            device=self.device,
            seed=cfg.seed,
            weights_dir=cfg.weights_dir,
            data=cfg.data,
            cache_dir=str(cfg.eval.cache_dir or self.rundir.default_eval_cache),
        )
        factors = [
            reg.build(getattr(cfg, name), ctx)
            for name, reg in DENOISER_FACTORS.items()
            if getattr(cfg, name) is not None
        ]
        self.denoiser = Denoiser(prx, factors).to(self.device, self.precision.weights)
        self.compiled = compiled(cfg.train.compile, self.denoiser, self.device)  # blocks, before FSDP
        self.parallel = parallel.wrap(cfg.parallel, self.denoiser, dist, self.precision)  # DDP or FSDP
        self.net = self.parallel.net
        self.optimizer = OPTIMIZERS.build(cfg.optimizer, self.denoiser, dist)
        self.ema = ema.build(cfg.ema, self.denoiser)
        self.loss_terms = [CONTRASTIVE.build(c) for c in [cfg.contrastive] if c is not None]
        self.generation = generation.build(self)  # loads eval extractors now: a missing weight fails early
        self.step = 0
        self.times = {"setup_s": time.perf_counter() - t0, "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}
        self.throughput: dict = {}

    @property
    def tokenizer(self):
        return self.inputs.tokenizer  # with the cache: built on first use (decoding samples)

    @property
    def text(self):
        return self.inputs.text  # with the cache: built on first use (encoding prompts)

    # -- the train step ------------------------------------------------------------------------
    def train_step(self, step: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this process's share of the global batch. Returns (loss, grad norm)."""
        cfg, dev = self.cfg, self.device
        n, b = cfg.train.batch_size, len(batch["caption"])
        mine = slice(self.dist.rank * b, (self.dist.rank + 1) * b)  # this process's rows of the global batch
        gen = step_generator(cfg.seed, step)
        t = flow.sample_t(n, cfg.flow, gen)[mine].to(dev)  # (b,)
        drop = (torch.rand(n, generator=gen) < cfg.train.caption_dropout)[mine].to(dev)  # (b,)

        images = batch["image"].to(dev, non_blocking=True)  # (b, 3, H, W) in [0, 1]
        with torch.no_grad():
            lat, txt, mask = self.inputs(batch, dev)  # Latents (b, C, h, w), (b, Lt, D), (b, Lt)
            empty_txt, empty_mask = self.inputs.empty()
            txt = torch.where(drop[:, None, None], empty_txt, txt)  # dropped captions → encoded ""
            mask = torch.where(drop[:, None], empty_mask, mask)
        gen_dev, shape = step_generator(cfg.seed, step, dev), (n, *lat.mean.shape[1:])
        noise = torch.randn(shape, generator=gen_dev, device=dev)[mine]
        # posterior sample of an autoencoder, drawn after `noise`: the same with or without the cache
        x0 = lat.sample(torch.randn(shape, generator=gen_dev, device=dev)[mine])  # (b, C, h, w)
        x0, noise = x0.to(self.precision.flow), noise.to(self.precision.flow)  # bf16: PRX's bf16 run
        xt = flow.interpolate(x0, noise, t)  # (b, C, h, w); fp32 t keeps it fp32 whatever x0's dtype

        self.optimizer.set_lr_factor(lr_factor(step, cfg.train.warmup_steps))
        with self.precision.context(), self.compiled.step():
            out = self.net(
                xt.to(self.precision.weights),
                t,
                txt.to(self.precision.weights),
                mask,
                inputs={"images": images, "step": step},
            )
        loss, v_pred, v_true = flow.loss(out.pred, x0, noise, xt, t, cfg.flow)
        total = loss + sum(out.losses.values()) + sum(term(v_pred, v_true) for term in self.loss_terms)
        total.backward()
        grad_norm = self.parallel.clip_grad_norm_(cfg.train.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update(step)
        return total.detach(), grad_norm.detach()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Result:
        """Train from the newest checkpoint to the last step, evaluating and saving on the way."""
        self.resume()
        self.write_status(RUNNING, restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        self.wandb = self.start_tracking("train")
        try:
            self.train_loop()
            result = self.write_result()
        finally:
            self.wandb.finish()
        self.write_status(DONE)
        return result

    def train_loop(self) -> None:
        cfg = self.cfg
        sampler = StepBatchSampler(
            len(self.train_set),
            cfg.train.batch_size,
            cfg.seed,
            self.step,
            cfg.train.steps,
            self.dist.rank,
            self.dist.world,
        )
        loader = DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=cfg.train.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.train.num_workers > 0,
        )
        window, losses = StepTimes(), []
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step, no sync
        self.denoiser.train()
        tick = time.perf_counter()
        for batch in loader:
            got = time.perf_counter()
            step = self.step
            loss, grad_norm = self.train_step(step, batch)
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            losses.append(loss)
            self.step = step + 1
            done = time.perf_counter()
            window.data, window.total, window.steps = (
                window.data + got - tick,
                window.total + done - tick,
                window.steps + 1,
            )
            tick = done
            last = self.step == cfg.train.steps
            evaluate, save = (
                self.step % cfg.eval.every == 0 or last,
                self.step % cfg.checkpoint.every == 0 or last,
            )
            if self.step % cfg.log.every == 0 or evaluate or save:
                self.check_finite(first_bad)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                    window.total += time.perf_counter() - tick
                    tick = time.perf_counter()
                mean_loss = (
                    self.dist.all_sum(torch.stack(losses).mean()) / self.dist.world
                )  # over all processes
                self.log_step(mean_loss.item(), grad_norm.item(), window)
                losses, window = [], StepTimes()
                if self.preemption.pending(self.dist) and not last:  # the job is stopping: save first
                    self.timed("checkpoint_s", self.save)
                    self.record_requeue(self.preemption.reason)
                    self.wandb.finish()  # flushed now: SIGKILL may follow within the cluster's KillWait
                    self.preemption.hand_over(self.dist)
            if evaluate:
                self.timed("eval_s", self.run_eval)
            if save:
                self.timed("checkpoint_s", self.save)
            tick = time.perf_counter()

    def check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad.item())
        if bad >= 0:
            kept = checkpoint.newest_verified(self.rundir, set_aside=False)
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad}; "
                f"last good checkpoint: {kept.name if kept else 'none'}"
            )

    def timed(self, key: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.times[key] += time.perf_counter() - t0

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Flow-matching loss on the held-out set at fixed (t, noise): comparable across arms and steps.

        t is an even grid over (0, 1); sample j's noise comes from a generator seeded by
        (VAL_SEED, j), so the number is the same whatever the number of processes.
        """
        n, cfg = len(self.val_set), self.cfg
        idx = list(range(self.dist.rank, n, self.dist.world))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.denoiser.eval()
        for chunk, counts in parallel.lockstep(idx, cfg.eval.batch_size, n, self.dist.world):
            items = [self.val_set[j] for j in chunk]
            batch = torch.utils.data.default_collate(items)
            lat, txt, mask = self.inputs(batch, self.device)
            x0 = lat.mean  # the posterior mean: the held-out loss stays deterministic
            noise = torch.stack(
                [torch.randn(x0.shape[1:], generator=step_generator(VAL_SEED, j)) for j in chunk]
            )
            noise = noise.to(self.device)
            t = torch.tensor([(j + 0.5) / n for j in chunk], device=self.device)
            xt = flow.interpolate(x0, noise, t)
            with self.precision.context():
                pred = self.denoiser(
                    xt.to(self.precision.weights), t, txt.to(self.precision.weights), mask
                ).pred
            v_pred = flow.velocity(pred.float(), xt, t, cfg.flow)
            v_true = flow.PREDICTIONS[cfg.flow.prediction]["target"](x0, noise, xt, t, cfg.flow)
            if counts:  # else a throw-away chunk that keeps this process in step with the others
                total += ((v_pred - v_true) ** 2).flatten(1).mean(1).double().sum()
        self.denoiser.train()
        return float(self.dist.all_sum(total).item() / n)

    def run_eval(self) -> dict:
        """The metrics at the current step, written to eval/step_N.json (and its grid) by the main process."""
        # eval shapes vary: not compiled; FSDP drops the weights eval gathered (the EMA's) at the end
        with self.ema.swapped(), self.compiled.eager(), self.parallel.evaluation():
            metrics = {"val_loss": self.validation_loss(), **self.generation(self.step)}
        if self.dist.main:
            self.rundir.write_eval(
                EvalRecord(
                    step=self.step,
                    metrics=metrics,
                    val_samples=len(self.val_set),
                    generated_samples=self.generation.n,
                )
            )
            print(
                f"[{self.name}] eval step {self.step}: "
                + ", ".join(f"{k} {v:.5g}" for k, v in metrics.items()),
                flush=True,
            )
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)
            self.wandb.image("eval/samples", self.rundir.eval_grid(self.step), self.step)
        return metrics

    def rescore(self, step: int | None = None) -> dict:
        """Evaluate checkpoint `step` (default: the newest) of a run again, without training.

        Writes eval/step_N.json and its grid; result.json's copy of the metrics follows.
        """
        path = checkpoint.newest_verified(self.rundir) if step is None else self.rundir.checkpoint(step)
        if path is None or not path.exists():
            kept = ", ".join(map(str, self.rundir.checkpoint_steps())) or "none"
            raise FileNotFoundError(
                f"{self.rundir.path}: no {'verified ' if step is None else ''}checkpoint at step "
                f"{step if step is not None else '(any)'}; checkpoints kept: {kept}"
            )
        if step is not None and (problem := checkpoint.verify(path)) is not None:
            raise checkpoint.CorruptCheckpoint(f"{path}: fails verification ({problem})")
        weights, state = checkpoint.load(path)
        self.parallel.load_weights(weights)
        self.parallel.load_ema_state(self.ema, state["ema"])
        self.step = state["step"]
        self.wandb = self.start_tracking("eval")
        try:
            metrics = self.run_eval()
        finally:
            self.wandb.finish()
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> None:
        # every process takes part in gathering sharded state (FSDP); the main process writes it
        weights = self.parallel.weights()
        optimizer = self.parallel.optimizer_state(self.optimizer)
        ema_state = self.parallel.ema_state(self.ema)
        if self.dist.main:
            state = {
                "optimizer": optimizer,
                "ema": ema_state,
                "data": {"seed": self.cfg.seed, "step": self.step},
                "timing": {"times": self.times, "throughput": self.throughput},  # a resume keeps counting
            }
            checkpoint.save(self.rundir, self.step, self.denoiser, weights, state, self.cfg.checkpoint.keep)
        self.dist.barrier()

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies (or start afresh): temporary folders of a
        killed save are deleted, checkpoints that fail verification set aside, and log lines of steps
        after the checkpoint (or a torn last line) dropped, so the log has each step once."""
        path = None
        if self.dist.main:
            for tmp in checkpoint.clean_partial(self.rundir):
                print(f"[{self.name}] removed the partial checkpoint {tmp.name} of a killed save", flush=True)
            path = checkpoint.newest_verified(self.rundir)
        path = self.dist.broadcast_object(path)
        if path is not None:
            weights, state = checkpoint.load(path)
            self.parallel.load_weights(weights)
            self.parallel.load_optimizer_state(self.optimizer, state["optimizer"])
            self.parallel.load_ema_state(self.ema, state["ema"])
            checkpoint.set_rng_state(state["rng"])
            self.step = state["step"]
            timing = state.get("timing", {})
            self.times = {k: v + (self.times["setup_s"] if k == "setup_s" else 0.0)
                          for k, v in timing.get("times", self.times).items()}  # fmt: skip
            self.throughput = timing.get("throughput", {})
        if self.dist.main:
            torn = self.rundir.truncate_log(self.step)
            if torn:
                print(f"warning: {self.rundir.log}: dropped {torn} torn line(s) a killed write left",
                      file=sys.stderr, flush=True)  # fmt: skip
            if path is not None:
                print(f"[{self.name}] resumed from {path.name}", flush=True)

    # -- the run directory -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name or self.rundir.name

    def record_requeue(self, reason: str) -> None:
        """Saved because the job is stopping: in flight again (`submitted`), one more requeue on record."""
        if not self.dist.main:
            return
        requeues = (self.rundir.read_status() or Status()).requeues + 1
        last = Requeue(step=self.step, reason=reason, at=now())
        self.write_status(SUBMITTED, requeues=requeues, last_requeue=last)
        print(f"[{self.name}] {reason}: saved step {self.step}, requeue {requeues}", flush=True)

    def write_status(self, state: str, error: str | None = None, loss: float | None = None, **extra) -> None:
        if not self.dist.main:
            return
        fields = {"loss": loss} if loss is not None else {}  # else the last logged loss stays
        self.rundir.set_status(
            state,
            only_from=TRAINER_OVERWRITES,  # a cancelled arm stays cancelled while its job dies
            step=self.step,
            total_steps=self.cfg.train.steps,
            error=error,
            pid=os.getpid(),
            host=socket.gethostname(),
            world_size=self.dist.world,
            **fields,
            **extra,
        )

    def log_step(self, loss: float, grad_norm: float, window: StepTimes) -> None:
        cfg, per_step = self.cfg, window.total / window.steps
        self.times["train_s"] += window.total
        warm = self.step > min(10, cfg.train.steps // 5)  # throughput excludes the first steps' warm-up
        if warm:
            tp = self.throughput.setdefault("_acc", [0.0, 0.0, 0])
            tp[0], tp[1], tp[2] = tp[0] + window.data, tp[1] + window.total, tp[2] + window.steps
        row = LogRow(
            step=self.step,
            loss=loss,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            batches_per_s=1 / per_step,
            samples_per_s=cfg.train.batch_size / per_step,
            data_s=window.data / window.steps,
            compute_s=(window.total - window.data) / window.steps,
            eta_s=per_step * (cfg.train.steps - self.step),
            time=now(),
        )
        if not self.dist.main:
            return
        self.rundir.append_log(row)
        self.write_status(RUNNING, loss=loss)
        eta = time.strftime("%H:%M:%S", time.gmtime(row.eta_s))
        print(
            f"[{self.name}] step {self.step}/{cfg.train.steps} loss {loss:.4f} lr {row.lr:.2e} "
            f"| {row.batches_per_s:.2f} batch/s {row.samples_per_s:.1f} samples/s "
            f"(data {100 * window.data / window.total:.0f}%) | ETA {eta}",
            flush=True,
        )
        logged = row.model_dump(exclude={"step", "time"})
        self.wandb.log({f"train/{k}": v for k, v in logged.items()}, step=self.step)

    def summary_throughput(self) -> dict:
        data, total, steps = self.throughput.get("_acc", [0.0, 0.0, 0])
        if steps == 0:
            return {}
        step_s = total / steps
        return {
            "batches_per_s": 1 / step_s,
            "samples_per_s": self.cfg.train.batch_size / step_s,
            "step_s": step_s,
            "data_s": data / steps,
            "compute_s": (total - data) / steps,
            "steps_measured": steps,
            "world_size": self.dist.world,
        }

    def write_result(self) -> Result:
        result = Result(
            name=self.name,
            step=self.step,
            throughput=Throughput(**self.summary_throughput()),
            timings=self.times,
            versions=versions(self.device),
            finished_at=now(),
        )
        if self.dist.main:
            self.rundir.write_result(result)
        return result

    def start_tracking(self, job: str) -> tracking.Tracker:
        """The arm's W&B run (main process only): job `train`, or `eval` for re-scoring this step."""
        if not self.dist.main:
            return tracking.Tracker()
        return tracking.start(
            self.cfg.log.wandb,
            self.rundir.path,
            self.spec.model_copy(update={"name": self.name}),
            self.cfg.model_dump(mode="json"),
            job=job,
            step=self.step,
        )


def versions(device: torch.device) -> dict:
    import diffusers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "code": str(Path(__file__).resolve().parent.parent),  # the snapshot this job imported
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def read_spec(run: RunDir) -> Spec:
    """The arm's identity (name, sweep, delta, hash) for logs and W&B; empty for a folder made by hand."""
    try:
        return run.read_spec() or Spec()
    except Unreadable as e:
        print(f"warning: {e}; the arm is named after its folder", file=sys.stderr, flush=True)
        return Spec()
