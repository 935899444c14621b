"""The training loop: the document's algorithm (draw t, draw z, form x_t by (3), regress the model on z) under
Accelerate, over every step t = 0..T-1, with EMA, checkpoints that resume exactly, and sample grids."""

import copy
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    broadcast,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import is_xformers_available
from huggingface_hub import HfApi
from tqdm.auto import tqdm
from transformers import get_inverse_sqrt_schedule

from . import checkpointing, data
from .atomic_files import write_json
from .errors import first_line
from .evaluation import SampleEvaluator
from .hub import FaceDiffPipeline
from .learned_variance import VLB_WEIGHT, variational_bound
from .model_card import training_card_facts, training_evaluation_facts, write_model_card
from .output_dir import check_output_dir, clear_previous_run, refuse_a_different_run
from .pipelines import FaceDiffScheduler
from .precision import native_bf16
from .pretrained import channels_for_base, load_pretrained_base, settings_for_base
from .sample_grids import log_images, sample_images, save_grid
from .stop_signals import StopRequest, TrainingInterrupted
from .training_args import INVERSE_SQRT_SCHEDULE, TrainingArguments
from .training_evaluation import (
    BEST_EVAL_NAME,
    EVAL_CURVE_NAME,
    MEMORISATION_WARNING_SHARE,
    TrainingEvaluator,
    load_best_eval,
    plot_eval_curve,
    read_best_eval,
    read_eval_log,
    rewind_evaluations,
    training_reference,
)
from .unet_presets import unet_config

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite; the weights were not updated with them."""


# fp16's gradient scaler skips a step whose gradients overflow and halves its scale, from 2**16. Still overflowing
# after this many halvings in a row, the gradients are non-finite at any scale: skipping on would train nothing.
MAX_CONSECUTIVE_SKIPPED_STEPS = 25
# The devices with PyTorch's fused AdamW kernel (torch.utils._foreach_utils lists them, privately).
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


@dataclass
class TrainingResult:
    output_dir: Path
    global_step: int
    final_loss: float
    wall_time_s: float
    unet: UNet2DModel  # this process's trained weights (not the EMA), unwrapped


def train(args: TrainingArguments) -> TrainingResult:
    """
    Train a UNet2DModel as a DDPM noise predictor and save a `FaceDiffPipeline` into `args.output_dir`.

    Args:
        args (`TrainingArguments`):
            The run's settings.

    Returns:
        `TrainingResult`
    """
    started = time.monotonic()
    output_dir = Path(args.output_dir)
    _check_logger_installed(args)
    accelerator = _make_accelerator(args, output_dir)
    check_output_dir(args, output_dir)
    if args.push_to_hub and accelerator.is_main_process:
        _create_hub_repo(args, output_dir)
    set_seed(args.seed, device_specific=True)

    base = None
    if args.pretrained_model_name_or_path is not None:
        with accelerator.main_process_first():  # one download, then the cache for the other processes
            base = load_pretrained_base(args.pretrained_model_name_or_path, args.cache_dir)
        args = settings_for_base(args, base)
    source = args.image_source()
    try:
        with accelerator.main_process_first():
            raw_dataset, image_column = data.load_raw_dataset(source)
            channels = args.num_channels or data.detect_channels(raw_dataset, image_column)
        if base is not None:
            channels = channels_for_base(base, args.num_channels, channels)
        if args.resume_from_checkpoint is not None:
            refuse_a_different_run(args, output_dir, channels)
        # Saved as such in checkpoints and training_args.json, so that a resume compares the values this run used.
        args = args.in_effect(channels)
        with accelerator.main_process_first():
            train_dataset = data.preprocess_images(raw_dataset, image_column, source, channels)
    except data.ImageSourceError as error:
        raise ValueError(args.name_data_flags(error)) from error
    if len(train_dataset) < args.train_batch_size:
        raise ValueError(
            f"Only {len(train_dataset)} usable images for a batch of {args.train_batch_size}: "
            "lower --train_batch_size or add images."
        )
    if args.train_batch_size % accelerator.num_processes:
        raise ValueError(
            f"--train_batch_size {args.train_batch_size} is the global batch and must split evenly between "
            f"{accelerator.num_processes} processes."
        )
    if args.eval_steps is not None and len(train_dataset) < 2:
        raise ValueError(
            f"--eval_steps compares samples with the training images and needs at least 2 of them, got "
            f"{len(train_dataset)}: add images, or drop --eval_steps."
        )
    dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch must not draw from the global RNG, or a resumed run would drift.
        generator=torch.Generator().manual_seed(args.seed),
    )

    if base is not None:
        unet, noise_scheduler = base.unet, base.scheduler
        # Sampled another way than the base where a flag says so; trained the same.
        flags = {"variance_type": args.variance_type, "clip_sample": args.clip_sample}
        sampling = {name: value for name, value in flags.items() if value is not None}
        if sampling:
            noise_scheduler = FaceDiffScheduler.from_config(noise_scheduler.config, **sampling)
        logger.info(f"Fine-tuning {args.pretrained_model_name_or_path} ({unet.num_parameters():,} parameters)")
    else:
        unet = _build_model(args, channels)
        noise_scheduler = FaceDiffScheduler(
            num_train_timesteps=args.ddpm_num_steps,
            beta_schedule=args.ddpm_beta_schedule,
            prediction_type=args.prediction_type,
            variance_type=args.variance_type or "fixed_large",
            clip_sample=bool(args.clip_sample),
        )
    optimizer = build_optimizer(args, unet.parameters(), accelerator)
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.total_train_steps(steps_per_epoch)
    # Stepped by hand once per optimizer step, so its position means the same whatever the number of processes.
    lr_scheduler = build_lr_scheduler(args, optimizer, max_train_steps)
    checkpoint = _checkpoint_to_resume(args, output_dir, max_train_steps)
    ema = None
    if args.use_ema:
        ema = EMAModel(
            unet.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=unet.config,
            foreach=True,  # one multi-tensor update per step rather than one per parameter: fewer GPU launches
        )
        ema.to(accelerator.device)

    if args.enable_xformers_memory_efficient_attention:
        _use_xformers(unet, accelerator.device)
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    # In every checkpoint, so that `facediff export` makes a pipeline of one without the data or the flags.
    pipeline_configs = {"unet": dict(accelerator.unwrap_model(unet).config), "scheduler": dict(noise_scheduler.config)}

    scorer = None
    if args.eval_steps is not None and accelerator.is_main_process:
        # Fitted once per run. Mirrored copies count as copies when training flips: the model learns both faces.
        reference = training_reference(train_dataset, args.seed)
        scorer = SampleEvaluator(reference, inception=None, seed=args.seed, count_mirrored_copies=args.random_flip)

    # Only now, with the data and the model set up, is the old run deleted: a mistake in them loses nothing.
    if accelerator.is_main_process:
        clear_previous_run(args, output_dir)
        rewind_evaluations(output_dir, checkpoint)
    accelerator.wait_for_everyone()
    evaluator = (
        TrainingEvaluator(scorer, args, output_dir, _half_precision(accelerator)) if scorer is not None else None
    )
    global_step = _resume(accelerator, checkpoint, ema)
    train_seconds = checkpointing.checkpoint_train_seconds(checkpoint) if checkpoint is not None else 0.0
    # An epoch's last optimizer step may accumulate fewer batches, so place the resume point by steps, not batches.
    first_epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    batches_to_skip = steps_into_epoch * args.gradient_accumulation_steps
    epochs = range(first_epoch, math.ceil(max_train_steps / steps_per_epoch)) if max_train_steps else count(first_epoch)

    if accelerator.is_main_process:
        accelerator.init_trackers("facediff", config=_loggable(args))
    length = [f"{max_train_steps} steps"] if max_train_steps else []
    length += [f"{args.max_train_minutes:g} minutes"] if args.max_train_minutes is not None else []
    logger.info(
        f"Training on {len(train_dataset)} images ({channels} channel(s), {args.effective_resolution}px), "
        f"{' or '.join(length)} of {args.train_batch_size} images a step on {accelerator.num_processes} process(es)"
    )
    # The bar closes on an error too, so that the error is the last line printed.
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Training", disable=not accelerator.is_local_main_process
    )
    finished = _finished(accelerator, args, global_step, max_train_steps, train_seconds)
    with StopRequest() as stop, progress:
        running_loss, window_start, window_images, skipped_in_a_row = None, time.monotonic(), 0, 0
        # Training time: what the steps take, evaluations, sample grids and checkpoints left out.
        clock_start = time.monotonic()
        for epoch in epochs:
            if finished:  # also when resuming from a checkpoint at the last step
                break
            dataloader.set_epoch(epoch)
            batches = dataloader
            if epoch == first_epoch and batches_to_skip:
                batches = accelerator.skip_first_batches(dataloader, batches_to_skip)
            for batch in batches:
                with accelerator.accumulate(unet):
                    loss = _diffusion_loss(unet, noise_scheduler, batch[data.PIXELS], args)
                    losses = accelerator.gather(loss.detach()[None])
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm or math.inf)
                    mean_loss, norm = _read_loss_and_norm(losses, grad_norm)
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLossError(_non_finite_message(global_step + 1, "loss", losses, output_dir))
                    # A gradient scaler (fp16 on CUDA) skips such a step by itself and lowers its scale, up to
                    # MAX_CONSECUTIVE_SKIPPED_STEPS times; without one (any other precision, or fp16 on a CPU,
                    # where Accelerate runs float32) stop now.
                    if accelerator.scaler is None and not math.isfinite(norm):
                        message = _non_finite_message(global_step + 1, "gradient norm", grad_norm, output_dir)
                        raise NonFiniteLossError(message)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_images += args.train_batch_size
                if not accelerator.sync_gradients:
                    continue
                if accelerator.optimizer_step_was_skipped:
                    skipped_in_a_row += 1
                    if skipped_in_a_row == MAX_CONSECUTIVE_SKIPPED_STEPS:
                        what = f"gradient norm (non-finite at every fp16 loss scale for {skipped_in_a_row} steps)"
                        raise NonFiniteLossError(_non_finite_message(global_step + 1, what, grad_norm, output_dir))
                else:
                    skipped_in_a_row = 0
                    lr_scheduler.step()  # as Accelerate's own scheduler wrapper: the schedule counts real updates
                if ema is not None:
                    ema.step(unet.parameters())
                global_step += 1
                running_loss = mean_loss if running_loss is None else 0.98 * running_loss + 0.02 * mean_loss
                images_per_second = window_images / max(time.monotonic() - window_start, 1e-9)
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_per_second}
                accelerator.log(logs, step=global_step)
                progress.update(1)
                progress.set_postfix(
                    loss=f"{running_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.0f}"
                )

                train_seconds += time.monotonic() - clock_start
                finished = _finished(accelerator, args, global_step, max_train_steps, train_seconds)

                # Before the checkpoint of the same step: a resume from it trains on from the next step, and would
                # never evaluate this one.
                if args.eval_steps is not None and global_step % args.eval_steps == 0:
                    if evaluator is not None:
                        _evaluate(
                            accelerator, evaluator, unet, noise_scheduler, ema, output_dir, global_step, train_seconds
                        )
                    accelerator.wait_for_everyone()
                # The last step too, as diffusers' example does: the same command with more steps or minutes and
                # --resume_from_checkpoint latest extends a finished run where it ended.
                if global_step % args.checkpointing_steps == 0 or finished:
                    saved = checkpointing.save_checkpoint(
                        accelerator, output_dir, global_step, args.checkpoints_total_limit, args.to_dict(),
                        run_files=_files_to_checkpoint(output_dir), train_seconds=train_seconds,
                        pipeline_configs=pipeline_configs,
                    )  # fmt: skip
                    logger.info(f"Saved checkpoint {saved}")
                if global_step % args.save_images_steps == 0 and not finished:
                    _save_samples(args, accelerator, unet, noise_scheduler, ema, output_dir, global_step)
                if global_step % 50 == 0:
                    window_start, window_images = time.monotonic(), 0
                if stop.signum is not None:
                    accelerator.set_trigger()
                if accelerator.check_trigger() and not finished:  # every process stops together
                    _stop_on_signal(
                        args, accelerator, output_dir, global_step, stop.signum, train_seconds, pipeline_configs
                    )
                if finished:
                    break
                clock_start = time.monotonic()
            else:  # the epoch ran to its end; a finished run's last grid and pipeline are saved below instead
                _end_of_epoch(args, accelerator, unet, noise_scheduler, ema, output_dir, epoch, global_step)
                clock_start = time.monotonic()

    if max_train_steps is None or global_step < max_train_steps:
        logger.info(
            f"Stopped at step {global_step}: {train_seconds / 60:.1f} minutes of training (--max_train_minutes)"
        )

    if evaluator is not None and evaluator.last_step != global_step:  # the last step, when off the --eval_steps
        _evaluate(accelerator, evaluator, unet, noise_scheduler, ema, output_dir, global_step, train_seconds)
    accelerator.wait_for_everyone()
    wall_time = time.monotonic() - started
    if accelerator.is_main_process:
        _save_final(
            args,
            accelerator,
            unet,
            noise_scheduler,
            ema,
            output_dir,
            global_step,
            channels,
            len(train_dataset),
            wall_time,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    final_loss = running_loss if running_loss is not None else math.nan
    return TrainingResult(output_dir, global_step, final_loss, wall_time, accelerator.unwrap_model(unet))


def _read_loss_and_norm(losses: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[float, float]:
    """The batch's mean loss and the gradient norm (0 between accumulated batches) as numbers, in one read from the
    device: on a GPU each read waits for the device, so reading once lets the next batch's work queue sooner."""
    norm = torch.zeros_like(losses[0]) if grad_norm is None else torch.as_tensor(grad_norm, device=losses.device)
    mean_loss, norm = torch.stack([losses.mean(), norm.to(losses.dtype)]).tolist()
    return mean_loss, norm


def _finished(accelerator, args, global_step: int, max_train_steps: int | None, train_seconds: float) -> bool:
    """Whether the run has trained its steps or its minutes. The main process's clock decides for all, so that every
    process stops at the same step."""
    if max_train_steps is not None and global_step >= max_train_steps:
        return True
    if args.max_train_minutes is None:
        return False
    out_of_time = train_seconds >= 60 * args.max_train_minutes
    if accelerator.num_processes > 1:
        out_of_time = bool(broadcast(torch.tensor([out_of_time], device=accelerator.device)).item())
    return out_of_time


def _stop_on_signal(
    args,
    accelerator: Accelerator,
    output_dir: Path,
    global_step: int,
    signum: int | None,
    train_seconds: float,
    pipeline_configs: dict,
):
    saved = checkpointing.save_checkpoint(
        accelerator, output_dir, global_step, args.checkpoints_total_limit, args.to_dict(),
        run_files=_files_to_checkpoint(output_dir), train_seconds=train_seconds, pipeline_configs=pipeline_configs,
    )  # fmt: skip
    name = signal.Signals(signum).name if signum is not None else "a signal on another process"
    raise TrainingInterrupted(
        f"Stopped by {name} at step {global_step}; saved {saved}. Resume with the same command plus "
        "--resume_from_checkpoint latest.",
        signum or signal.SIGTERM,
    )


def _diffusion_loss(unet, scheduler: FaceDiffScheduler, pixels: torch.Tensor, args: TrainingArguments) -> torch.Tensor:
    """The document's training objective at t drawn uniformly from all T steps (t = 0 included)."""
    clean = pixels.float().div(127.5).sub(1.0)
    if args.random_flip:
        flip = torch.rand(clean.shape[0], device=clean.device) < 0.5
        clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if args.prediction_type == "epsilon":
        target = noise
    elif args.prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = clean

    prediction = unet(noisy, timesteps).sample
    if args.learns_variance:
        prediction, variance_output = prediction.chunk(2, dim=1)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=args.snr_gamma)
        weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
        loss = loss * weights[args.prediction_type]
    if args.learns_variance:  # Improved DDPM's hybrid loss: the bound trains the variance, not the mean
        bound = variational_bound(
            scheduler, clean, noisy, timesteps, prediction.detach(), args.prediction_type, variance_output
        )
        loss = loss + VLB_WEIGHT * bound
    return loss.mean()


def _make_accelerator(args: TrainingArguments, output_dir: Path) -> Accelerator:
    # accelerate only starts a multi-process CPU group (gloo) when told it runs on CPU.
    launched_many = int(os.environ.get("WORLD_SIZE", "1")) > 1
    mixed_precision, precision_reason = _mixed_precision(args)
    accelerator = Accelerator(
        cpu=launched_many and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed),
    )
    if accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local_processes))
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
        handlers=[_TqdmLoggingHandler()],
    )  # fmt: skip
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line of ours per checkpoint, not six
    logger.info(f"Mixed precision {accelerator.mixed_precision}: {precision_reason}")
    return accelerator


def _half_precision(accelerator: Accelerator) -> torch.dtype | None:
    """The run's half precision, for the low-noise half of the chains that it samples (the pipeline's
    `low_noise_dtype`)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def _mixed_precision(args: TrainingArguments) -> tuple[str, str]:
    """`--mixed_precision`, with `auto` resolved, and why."""
    if args.mixed_precision != "auto":
        return args.mixed_precision, "--mixed_precision"
    # `accelerate launch` passes its --mixed_precision (or `accelerate config`'s) on in this variable, "no" by default.
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher, "as accelerate launch asks"
    native, reason = native_bf16("cuda" if torch.cuda.is_available() else "cpu")
    return ("bf16" if native else "no"), f"{reason}; --mixed_precision no or bf16 overrides"


class _TqdmLoggingHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record), file=self.stream)


def _build_model(args: TrainingArguments, channels: int) -> UNet2DModel:
    """The UNet to train from scratch; with a learned variance, its output has twice the channels: the prediction,
    then the variance output."""
    outputs = 2 * channels if args.learns_variance else channels
    if args.model_config_name_or_path is None:
        return UNet2DModel(
            **{**unet_config(args.model_preset, args.effective_resolution, channels), "out_channels": outputs}
        )
    config = UNet2DModel.load_config(args.model_config_name_or_path)
    if config.get("in_channels") != channels or config.get("out_channels") not in (channels, outputs):
        raise ValueError(
            f"--model_config_name_or_path {args.model_config_name_or_path} takes {config.get('in_channels')} "
            f"channel(s) but the data has {channels}: pass --num_channels {config.get('in_channels')} "
            "or fix the config."
        )
    config.update(sample_size=args.effective_resolution, out_channels=outputs)
    return UNet2DModel.from_config(config)


def _checkpoint_to_resume(args: TrainingArguments, output_dir: Path, max_train_steps: int | None) -> Path | None:
    """The checkpoint to resume from, if any; one past this run's last step is refused, as nothing can undo steps."""
    if args.resume_from_checkpoint is None:
        return None
    checkpoint = checkpointing.resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is None:
        logger.info(f"No checkpoint in {output_dir} yet: starting from step 0")
        return None
    step = checkpointing.checkpoint_step(checkpoint)
    if max_train_steps is not None and step > max_train_steps:
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: {checkpoint.name} is at step {step}, past the "
            f"{max_train_steps} step(s) this run trains for: raise --max_train_steps (or --num_epochs) to at least "
            f"{step}, or resume from an earlier checkpoint."
        )
    return checkpoint


def build_optimizer(args: TrainingArguments, parameters, accelerator: Accelerator) -> torch.optim.AdamW:
    """
    AdamW with the run's settings, as one fused kernel over all weights where PyTorch has it for the device.

    The fused update is the same AdamW as PyTorch's default per-weight loop (up to float rounding), in one pass over
    the weights instead of a dozen small operations per weight tensor. Under fp16's gradient scaler it is not fused:
    the fused kernel skips an overflowing step inside itself, where Accelerate's `optimizer_step_was_skipped` cannot
    see it.

    Args:
        args (`TrainingArguments`): the run's settings (`learning_rate`, `adam_beta1`, `adam_beta2`,
            `adam_weight_decay`, `adam_epsilon`).
        parameters (`Iterable[torch.nn.Parameter]`): the weights to train.
        accelerator (`Accelerator`): the run's, for its device and gradient scaler.
    """
    return torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=accelerator.device.type in FUSED_ADAMW_DEVICES and accelerator.scaler is None,
    )


def build_lr_scheduler(
    args: TrainingArguments, optimizer: torch.optim.Optimizer, max_train_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """
    The learning-rate schedule `--lr_scheduler` names: diffusers' (`get_scheduler`), or transformers' inverse square
    root, which needs no run length and so suits a run bounded by `--max_train_minutes`.

    Args:
        args (`TrainingArguments`): the run's settings (`lr_scheduler`, `lr_warmup_steps`).
        optimizer (`torch.optim.Optimizer`): the optimizer whose rate it scales.
        max_train_steps (`int`): the run's length, over which diffusers' decaying schedules decay.
    """
    if args.lr_scheduler == INVERSE_SQRT_SCHEDULE:
        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=args.lr_warmup_steps)
    return get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )


def _resume(accelerator: Accelerator, checkpoint: Path | None, ema: EMAModel | None) -> int:
    if checkpoint is None:
        return 0
    accelerator.load_state(str(checkpoint))
    if ema is not None:
        # load_state reads the EMA onto the CPU and EMAModel.load_state_dict keeps those tensors: back to the
        # model's device, or the next EMA step would mix devices on a GPU.
        ema.to(accelerator.device)
    step = checkpointing.checkpoint_step(checkpoint)
    logger.info(f"Resumed from {checkpoint} at step {step}")
    return step


def _non_finite_message(step: int, what: str, values: torch.Tensor, output_dir: Path) -> str:
    checkpoints = checkpointing.list_checkpoints(output_dir)
    # A resume restores the checkpoint's learning rate, so a lower one needs a fresh run.
    kept = (
        f"the last good checkpoint, {checkpoints[-1]}, is kept: resume from it with --resume_from_checkpoint "
        "latest --mixed_precision no if fp16 overflowed, or start again with a lower --learning_rate in another "
        "--output_dir (or with --overwrite_output_dir)"
        if checkpoints
        else "no checkpoint was written yet: restart with a lower --learning_rate (or --mixed_precision no)"
    )
    return (
        f"The {what} became {values.tolist()} at step {step}; training stopped before updating the weights, and {kept}."
    )


def _files_to_checkpoint(output_dir: Path) -> list[Path]:
    """The run's files that a resume needs as they were at the checkpoint's step: the best evaluation's weights."""
    return [path for path in (output_dir / BEST_EVAL_NAME,) if path.is_file()]


def _evaluate(
    accelerator,
    evaluator: TrainingEvaluator,
    unet,
    scheduler,
    ema,
    output_dir: Path,
    global_step: int,
    train_seconds: float,
):
    """Evaluate on the main process and send the scores to the tracker."""
    with checkpointing.explain_disk_full(f"the evaluation at step {global_step}", output_dir):
        record = evaluator.evaluate(accelerator.unwrap_model(unet), scheduler, ema, global_step, train_seconds)
    scores = {
        "eval/pixel_pca_fd": record["pixel_pca_fd"],
        "eval/pixel_pca_kid": record["pixel_pca_kid_mean"],
        "eval/pixel_pca_kid_std": record["pixel_pca_kid_std"],
        "eval/memorised_share": record["memorised_share"],
        "eval/high_frequency_ratio": record["high_frequency_ratio"],
    }
    accelerator.log(scores, step=global_step)


def _save_samples(args, accelerator, unet, scheduler, ema, output_dir: Path, global_step: int):
    if accelerator.is_main_process:
        images = sample_images(
            accelerator.unwrap_model(unet),
            scheduler,
            args.eval_batch_size,
            args.num_inference_steps,
            args.seed,
            ema,
            _half_precision(accelerator),
        )
        grid = output_dir / "samples" / f"step-{global_step:06d}.png"
        with checkpointing.explain_disk_full(f"the sample grid {grid.name}", output_dir):
            save_grid(images, grid)
        log_images(accelerator, images, global_step)
    accelerator.wait_for_everyone()


def _end_of_epoch(args, accelerator, unet, scheduler, ema, output_dir: Path, epoch: int, global_step: int):
    """diffusers' example's saves at the end of every N epochs, counted from the first (epoch 0)."""
    if args.save_images_epochs is not None and epoch % args.save_images_epochs == 0:
        _save_samples(args, accelerator, unet, scheduler, ema, output_dir, global_step)
    if args.save_model_epochs is not None and epoch % args.save_model_epochs == 0:
        if accelerator.is_main_process:
            weights, _ = _final_weights(replace(args, save_best=False), accelerator.unwrap_model(unet), ema, output_dir)
            pipeline = FaceDiffPipeline(unet=weights, scheduler=FaceDiffScheduler.from_config(scheduler.config))
            with checkpointing.explain_disk_full(f"the pipeline of epoch {epoch}", output_dir):
                pipeline.save_pretrained(output_dir)
            logger.info(f"Saved the pipeline of epoch {epoch} (step {global_step}) in {output_dir}")
        accelerator.wait_for_everyone()


def _use_xformers(unet: UNet2DModel, device: torch.device) -> None:
    """--enable_xformers_memory_efficient_attention as diffusers' example means it, where xformers can run."""
    if is_xformers_available() and device.type == "cuda":
        unet.enable_xformers_memory_efficient_attention()
        logger.info("Attention runs through xformers (--enable_xformers_memory_efficient_attention)")
        return
    why = "is not installed" if not is_xformers_available() else "runs on CUDA GPUs only"
    logger.info(
        f"--enable_xformers_memory_efficient_attention: xformers {why}, so attention runs through PyTorch's "
        "scaled_dot_product_attention, diffusers' default, which saves the same memory"
    )


def _save_final(
    args, accelerator, unet, scheduler, ema, output_dir: Path, global_step, channels, num_images, wall_time
):
    unet, best = _final_weights(args, accelerator.unwrap_model(unet), ema, output_dir)
    images = sample_images(
        unet, scheduler, args.eval_batch_size, args.num_inference_steps, args.seed, None, _half_precision(accelerator)
    )
    log_images(accelerator, images, global_step)
    pipeline = FaceDiffPipeline(unet=unet, scheduler=FaceDiffScheduler.from_config(scheduler.config))
    evaluations = read_eval_log(output_dir)
    best_step = best["step"] if best is not None else None
    # Each write is atomic, so a full disk leaves the pipeline saved there before (if any) whole.
    with checkpointing.explain_disk_full("the final pipeline", output_dir):
        grid = save_grid(images, output_dir / "sample_grid.png")
        pipeline.save_pretrained(output_dir)
        write_json(output_dir / "training_args.json", args.to_dict())
        facts = training_card_facts(args, accelerator, unet, scheduler, global_step, channels, num_images, wall_time)
        facts.update(sample_grid=grid.name, best_eval_step=best_step)
        if evaluations:
            curve = plot_eval_curve(evaluations, output_dir / EVAL_CURVE_NAME, best_step)
            facts.update(training_evaluation_facts(args, evaluations, num_images, curve.name, best_step))
        else:  # one left by the run a resume started from, before its first evaluation: not this run's
            (output_dir / EVAL_CURVE_NAME).unlink(missing_ok=True)
        write_model_card(facts, output_dir)
    if args.push_to_hub:
        repo_id = _hub_repo_id(args, output_dir)
        try:
            commit = pipeline.push_to_hub(repo_id, private=args.hub_private_repo, card_folder=output_dir)
        except Exception as error:
            raise OSError(
                f"The trained pipeline is saved in {output_dir}, but pushing it to the Hub repo {repo_id} failed "
                f"({first_line(error)}): no need to train again, push the folder with "
                f'FaceDiffPipeline.from_pretrained("{output_dir}").push_to_hub("{repo_id}").'
            ) from error
        logger.info(f"Pushed the pipeline to {commit.repo_url} ({commit.commit_url})")
    if best is not None:
        later = _later_weights(output_dir, best_step)
        weights = f" (the weights of step {best_step}'s evaluation, the best: --save_best{later})"
    else:
        weights = " (EMA weights)" if ema is not None else ""
    logger.info(
        f"Saved the pipeline{weights}, its model card and sample grid ({grid}) in {output_dir}; logs in "
        f"{output_dir / args.logging_dir}"
    )


def _later_weights(output_dir: Path, best_step: int) -> str:
    """Where the last step's weights are when --save_best saved an earlier step's, and how to get them."""
    checkpoints = checkpointing.list_checkpoints(output_dir)
    if not checkpoints or checkpointing.checkpoint_step(checkpoints[-1]) == best_step:
        return ""
    last = checkpoints[-1]
    return f"; the last step's are in {last}, and `facediff export {last} OUT` makes a pipeline of them"


def _final_weights(args, unet: UNet2DModel, ema: EMAModel | None, output_dir: Path) -> tuple[UNet2DModel, dict | None]:
    """
    The model the pipeline is saved with: the best evaluation's weights with `--save_best`, else the EMA (or the
    trained) weights of the last step; `unet` itself is left as it is.

    Returns:
        `tuple[UNet2DModel, dict | None]`: the model, and the best evaluation's step and score when they are its
        weights.
    """
    best = read_best_eval(output_dir) if args.save_best else None
    if args.save_best and best is None:
        logger.warning(
            f"--save_best: every evaluation had more than {MEMORISATION_WARNING_SHARE:.0%} of its samples copying "
            "training images, so none was kept as the best; saving the last weights."
        )
    if best is None and ema is None:
        return unet, None
    final = copy.deepcopy(unet)
    if best is not None:
        final.load_state_dict(load_best_eval(output_dir))
    else:
        ema.copy_to(final.parameters())
    return final, best


def _check_logger_installed(args: TrainingArguments) -> None:
    """Accelerate only warns about a missing tracker and trains on without logs: refuse before training instead."""
    is_available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[args.logger]
    if not is_available():
        other = "wandb" if args.logger == "tensorboard" else "tensorboard"
        raise ValueError(
            f"--logger {args.logger} needs the {args.logger} package, which is not installed: "
            f"pip install {args.logger}, or log with --logger {other}."
        )


def _hub_repo_id(args: TrainingArguments, output_dir: Path) -> str:
    return args.hub_model_id or output_dir.resolve().name


def _create_hub_repo(args: TrainingArguments, output_dir: Path) -> None:
    """Create the Hub repo before training, as diffusers' train_unconditional.py does, so that a missing login or
    network stops the run now rather than after all of training."""
    repo_id = _hub_repo_id(args, output_dir)
    try:
        HfApi().create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
    except Exception as error:
        raise ValueError(
            f"--push_to_hub: cannot create the Hub repo {repo_id} ({first_line(error)}): log in with `hf auth login` "
            "(or set HF_TOKEN) and check the network and --hub_model_id, or train without --push_to_hub."
        ) from error


def _loggable(args: TrainingArguments) -> dict:
    """Tracker configs take scalars and strings only."""
    return {key: value for key, value in args.to_dict().items() if isinstance(value, (int, float, str, bool))}
