"""The shared trainer: set-up, the train step and the loop that reads top to bottom.

Every arm of a sweep runs this same code; only its config differs. Recipe factors act through the
component table (trainer/config.py): block hooks on the denoiser, loss terms, the EMA. Each other
component owns its cadence and its files: the recorder (log lines, status, eval records, result, W&B),
the evaluation, the checkpointer.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from core.atomic import Unreadable
from core.records import EvalRecord, Result, Spec
from core.rundir import DONE, RUNNING, RunDir, now
from trainer import flow
from trainer.config import TrainConfig, build_factors, identity
from trainer.data import cache
from trainer.data.sampling import train_sampler
from trainer.draws import Draws
from trainer.evaluation import Evaluation, GenerationMetrics, HeldOutLoss, Sampler
from trainer.factors.ema import NoEMA
from trainer.factors.optimizer import OPTIMIZERS, lr_factor
from trainer.factors.precision import PRECISION
from trainer.identity import HASH_VERSION
from trainer.model import DeferredPRX, Denoiser, FactorContext, build_prx
from trainer.recorder import Recorder
from trainer.runtime import parallel
from trainer.runtime.activations import checkpoint_blocks
from trainer.runtime.checkpoint import Checkpointer, Held
from trainer.runtime.clock import Clock, Window
from trainer.runtime.compile import compiled
from trainer.runtime.dist import Dist
from trainer.runtime.preempt import Preemption


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the arm stops as failed."""


class FirstNonFinite:
    """The first step whose loss or gradient norm was not finite, tracked on the device (no sync per step)."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)

    def see(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.step = torch.where((self.step < 0) & ~finite, step, self.step)

    def check(self, newest_kept: Callable[[], str]) -> None:
        if (bad := int(self.step.item())) >= 0:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad}; last good checkpoint: {newest_kept()}"
            )


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
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.preemption = preemption if preemption is not None else Preemption()
        run, self.step = RunDir(run_dir), 0
        self.clock = Clock(cfg.train.batch_size, cfg.train.steps, dist.world)
        with self.clock.timed("setup_s"):
            self.recorder = Recorder(run, read_spec(run), cfg.log, cfg.train.steps, dist.main, dist.world)
            self._build(run, inputs)

    def _build(self, run: RunDir, inputs: tuple | None) -> None:
        cfg, dist = self.cfg, self.dist
        # `ablate run` checked the launcher's processes; a job started another way is checked here
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
        for _, problem, expected in cfg.world_problems(dist.world, per_node):
            raise ValueError(f"{problem}; expected {expected}")
        if cfg.train.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)  # the denoiser's initial weights
        self.precision = PRECISION.build(cfg.precision, self.device)
        eval_cache = Path(cfg.eval.cache_dir or run.default_eval_cache)  # reference features, domain nets
        encoded = cfg.encoded(eval_cache)
        self.inputs, self.train_set, self.val_set = inputs or cache.build_inputs(
            encoded, cfg.cache, self.device, cfg.weights_dir
        )
        # sharded: the PRX is built on the meta device and each process materialises only its shards,
        # with the values the whole build draws (the factors after it draw what they would)
        deferred = None
        if cfg.parallel.shards_parameters and dist.world > 1:
            deferred = DeferredPRX.build(cfg.model, cfg.tokenizer.channels, cfg.text_encoder.dim)
        prx = deferred.prx if deferred else build_prx(cfg.model, cfg.tokenizer.channels, cfg.text_encoder.dim)
        ctx = self._factor_context(eval_cache)
        self.denoiser = Denoiser(prx, build_factors(cfg, "denoiser", ctx)).place(
            self.device, self.precision.weights
        )
        if cfg.train.activation_checkpointing:  # torchtitan's order: checkpointing, compile, then FSDP
            checkpoint_blocks(self.denoiser)
        self.compiled = compiled(cfg.train.compile, self.denoiser, self.device)  # blocks, before FSDP
        self.parallel = parallel.wrap(cfg.parallel, self.denoiser, dist, self.precision)  # DDP or FSDP
        if deferred:
            deferred.materialise(self.device)  # after sharding: one layer whole at a time
        self.net = self.parallel.net
        self.optimizer = OPTIMIZERS.build(cfg.optimizer, self.denoiser, dist)
        self.ema = next(iter(build_factors(cfg, "weights", self.denoiser)), NoEMA())
        self.loss_terms = build_factors(cfg, "loss", ctx)
        self.sampler = Sampler(self.denoiser, self.inputs, self.precision, cfg.flow, cfg.eval)
        held_out = HeldOutLoss(self.val_set, self.inputs, self.precision, cfg.flow, dist, cfg.eval.batch_size)
        # loads the metrics' extractors now: a missing weight fails before training
        generation = GenerationMetrics(cfg.eval, cfg.data, self.val_set, dist, cfg.weights_dir, eval_cache)
        self.evaluation = Evaluation(cfg.eval, held_out, generation, cfg.train.steps)
        held = Held(self.denoiser, self.parallel, self.optimizer, self.ema, dist)
        self.checkpointer = Checkpointer(cfg.checkpoint, run, cfg.train.steps, cfg.seed, held)

    def _factor_context(self, eval_cache: Path) -> FactorContext:
        cfg, sizes = self.cfg, self.cfg.model.sizes()
        return FactorContext(
            hidden_size=sizes["hidden_size"],
            depth=sizes["depth"],
            patch_size=sizes["patch_size"],
            resolution=cfg.data.resolution,
            downsample=cfg.tokenizer.downsample,
            device=self.device,
            weights_dir=cfg.weights_dir,
            data=cfg.data,
            cache_dir=str(eval_cache),
        )

    @property
    def tokenizer(self):
        return self.inputs.tokenizer  # with the cache: built on first use (decoding samples)

    @property
    def text(self):
        return self.inputs.text  # with the cache: built on first use (encoding prompts)

    # -- the train step ------------------------------------------------------------------------
    def train_step(self, step: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this process's share of the global batch. Returns (loss, grad norm).

        Every random number is drawn per sample, keyed by (seed, step, global sample index)
        (trainer/draws.py): this process draws only its own rows, and the step is the same at any
        number of processes and of micro-batches (`train.micro_batch_size`): each micro-batch's loss (the
        mean over its rows) is divided by the number of micro-batches, so their gradients add up to the
        whole batch's, averaged over the processes once, with the last micro-batch's backward."""
        cfg, rows = self.cfg, len(batch["caption"])
        draws = Draws.of_rank(cfg.seed, step, self.dist.rank, rows, self.device)
        self.optimizer.set_lr_factor(lr_factor(step, cfg.train.warmup_steps))
        size = cfg.train.micro_batch_size or rows
        parts = [slice(lo, lo + size) for lo in range(0, rows, size)]
        loss = torch.zeros((), device=self.device)
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            with contextlib.nullcontext() if last else self.parallel.accumulating():
                micro = self.loss(step, {key: v[part] for key, v in batch.items()}, draws[part]) / len(parts)
                micro.backward()
            loss += micro.detach()
        grad_norm = self.parallel.clip_grad_norm_(cfg.train.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update(step)
        return loss, grad_norm.detach()

    def loss(self, step: int, batch: dict, draws: Draws) -> torch.Tensor:
        """The loss of `batch` (this process's rows of the global batch, or a micro-batch of them), whose
        per-sample random numbers `draws` holds: its mean over the rows, every term included."""
        cfg, dev = self.cfg, self.device
        t = flow.draw_t(draws, cfg.flow).to(dev)  # (b,)
        drop = (draws.uniform("caption_dropout", device="cpu") < cfg.train.caption_dropout).to(dev)  # (b,)

        images = batch["image"].to(dev, non_blocking=True)  # (b, 3, H, W) in [0, 1]
        with torch.no_grad():
            lat, txt, mask = self.inputs(batch, dev)  # Latents (b, C, h, w), (b, Lt, D), (b, Lt)
            empty_txt, empty_mask = self.inputs.empty()
            txt = torch.where(drop[:, None, None], empty_txt, txt)  # dropped captions → encoded ""
            mask = torch.where(drop[:, None], empty_mask, mask)
        shape = lat.mean.shape[1:]
        noise = draws.normal("noise", shape)  # (b, C, h, w)
        # the posterior sample of an autoencoder: the same with or without the cache
        x0 = lat.draw(lambda: draws.normal("posterior", shape))  # (b, C, h, w)
        x0, noise = x0.to(self.precision.flow), noise.to(self.precision.flow)  # bf16: PRX's bf16 run
        xt = flow.interpolate(x0, noise, t)  # (b, C, h, w); fp32 t keeps it fp32 whatever x0's dtype

        with self.precision.context(), self.compiled.step():
            w = self.precision.weights
            out = self.net(
                xt.to(w), t, txt.to(w), mask, inputs={"images": images, "step": step, "draws": draws}
            )
        loss, v_pred, v_true = flow.loss(out.pred, x0, noise, xt, t, cfg.flow)
        # the tokenizer is looked up only by a term that decodes (with a cache it is built on first use)
        pred = flow.Prediction(v_pred, v_true, flow.clean(out.pred, xt, t, cfg.flow), t, images,
                               lambda z: self.tokenizer.signed(z))  # fmt: skip
        with self.precision.context():  # the perceptual terms' frozen networks run under the arm's autocast
            terms = [term(pred) for term in self.loss_terms]
        return loss + sum(out.losses.values()) + sum(terms)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Result:
        """Train from the newest checkpoint to the last step, evaluating and saving on the way."""
        self.resume()
        self.recorder.status(RUNNING, self.step, restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        self.recorder.start_wandb(self.cfg.model_dump(mode="json"), "train", self.step)
        self.dist.wait_for_main()  # W&B starts on the main process alone (up to log.wandb's init timeout)
        try:
            with self.checkpointer.writing():  # the last save is on disk before the result says done
                self.train_loop()
            result = Result(name=self.recorder.name, step=self.step, throughput=self.clock.throughput(),
                            timings=self.clock.times, versions=versions(self.device), finished_at=now())  # fmt: skip
            self.recorder.result(result)
        finally:
            self.recorder.finish()
        self.recorder.status(DONE, self.step)
        return result

    def train_loop(self) -> None:
        """Each component says when it acts: the recorder logs, the evaluation scores, the checkpointer saves."""
        last = self.cfg.train.steps
        window, bad = Window(self.device), FirstNonFinite(self.device)
        self.denoiser.train()
        for batch in window.batches(self.loader()):
            loss, grad_norm = self.train_step(self.step, batch)
            bad.see(self.step, loss, grad_norm)
            self.step += 1
            window.stepped(loss)
            evaluate, save = self.evaluation.should_eval(self.step), self.checkpointer.should_save(self.step)
            if self.recorder.should_log(self.step) or evaluate or save:
                bad.check(self.checkpointer.newest_kept)
                self.checkpointer.check()  # a save that failed in the background (a full disk) stops here
                window.sync()
                self.log(window, grad_norm)
                if self.preemption.pending(self.dist) and self.step < last:  # the job is stopping: save first
                    self.stop_for_requeue()
            if evaluate:
                with self.clock.timed("eval_s"):
                    self.run_eval()
            if save:
                self.save()
            window.resume()

    def loader(self) -> DataLoader:
        """The training batches from the current step on (this process's rows of each global batch)."""
        cfg = self.cfg
        sampler = train_sampler(self.train_set, cfg.data, cfg.train.batch_size, cfg.seed, self.step,
                                cfg.train.steps, self.dist.rank, self.dist.world)  # fmt: skip
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.train.num_workers,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=cfg.train.num_workers > 0)  # fmt: skip

    def log(self, window: Window, grad_norm: torch.Tensor) -> None:
        """The window's log line: its mean loss over every process, its speed."""
        loss = self.dist.all_sum(torch.stack(window.losses).mean()) / self.dist.world
        lr = self.optimizer.param_groups[0]["lr"]
        self.recorder.log(self.clock.row(self.step, loss.item(), grad_norm.item(), lr, window))
        window.clear()

    def stop_for_requeue(self) -> None:
        """Save and wait until it is on disk, say so, flush W&B (SIGKILL may follow within the cluster's
        KillWait), hand over to submitit."""
        self.save()
        with self.clock.timed("checkpoint_s"):
            self.checkpointer.wait()
        self.recorder.requeue(self.step, self.preemption.reason)
        self.recorder.finish()
        self.preemption.hand_over(self.dist)

    def save(self) -> None:
        with self.clock.timed("checkpoint_s"):
            self.checkpointer.save(self.step, self.clock.state_dict())

    # -- evaluation ----------------------------------------------------------------------------
    def run_eval(self, noise: bool | None = None) -> dict[str, float]:
        """The metrics at the current step, recorded in eval/step_N.json (its grid, and at the last step its
        eval noise) by the main process."""
        noise = self.step == self.cfg.train.steps if noise is None else noise
        # eval shapes vary: not compiled; FSDP drops the weights eval gathered (the EMA's) at the end
        with self.ema.swapped(), self.compiled.eager(), self.parallel.evaluation():
            metrics, grid, found = self.evaluation(self.denoiser, self.sampler, noise=noise)
        record = EvalRecord(step=self.step, metrics=metrics, val_samples=len(self.val_set),
                            generated_samples=self.evaluation.generation.n, resampled=list(found.resamples),
                            eval_hash=identity(self.cfg.model_dump(mode="json")).eval_hash,
                            hash_version=HASH_VERSION)  # fmt: skip
        if self.dist.main:
            self.recorder.eval(record, grid, found)
        self.dist.wait_for_main()  # the main process computed the metrics (the first time, the reference's)
        return metrics

    def rescore(self, step: int | None = None) -> dict[str, float]:
        """Evaluate checkpoint `step` (default: the newest) of a run again, without training: its
        eval/step_N.json and grid are written anew."""
        self.step = self.checkpointer.load_weights(step)
        self.recorder.start_wandb(self.cfg.model_dump(mode="json"), "eval", self.step)
        try:
            return self.run_eval(noise=True)
        finally:
            self.recorder.finish()

    # -- resuming --------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies (or start afresh), and drop log lines of
        steps after it (or a torn last line), so the log has each step once."""
        self.step, timing = self.checkpointer.resume(self.recorder.note)
        if timing is not None:
            self.clock.load_state_dict(timing)
        if self.dist.main and (torn := self.recorder.run.truncate_log(self.step)):
            print(f"warning: {self.recorder.run.log}: dropped {torn} torn line(s) a killed write left",
                  file=sys.stderr, flush=True)  # fmt: skip


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
