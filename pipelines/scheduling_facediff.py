# This file is written as it stands into every saved FaceDiffPipeline (as remote code), so it imports nothing from
# facediff: only torch, numpy and diffusers.
"""The document's DDPM as a diffusers scheduler: linear betas, the closed-form forward process (3) and the reverse
update, with respacing to fewer steps (Nichol & Dhariwal 2021)."""

import itertools
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# DDPMScheduler's, but fixed_large_log: its step takes the square root of a negative log-variance.
VARIANCE_TYPES = ("fixed_large", "fixed_small", "fixed_small_log", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class FaceDiffSchedulerOutput(BaseOutput):
    """
    Output of [`FaceDiffScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            x_{t-1}, the sample one step further down the chain; feed it to the model at the next step.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The model's estimate of x_0 at this step (clipped when `clip_sample` is on).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class FaceDiffScheduler(SchedulerMixin, ConfigMixin):
    """
    Denoising diffusion (DDPM) exactly as the source document writes it.

    With `alpha_t = 1 - beta_t` (1) and `alphabar_t = alpha_1 ... alpha_t`, the forward process in closed form is
    `x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) z` (3) and one reverse step is

        x_{t-1} = 1/sqrt(alpha_t) * (x_t - (1 - alpha_t)/sqrt(1 - alphabar_t) * eps) + sqrt(beta_t) * z,

    with z = 0 at the last step. The schedule is kept in float64, so it is at least as exact as diffusers'
    float32 `DDPMScheduler`. On a respaced chain s_1 < ... < s_N the same update runs with
    `beta'_i = 1 - alphabar_{s_i} / alphabar_{s_{i-1}}`, which keeps alphabar unchanged on the chosen steps.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            T, the number of diffusion steps the model is trained on.
        beta_start (`float`, defaults to 1e-4):
            beta_1 of the linear schedule.
        beta_end (`float`, defaults to 0.02):
            beta_T of the linear schedule. The document's text says 0.002 "as in the paper"; the DDPM paper uses
            0.02, and with 0.002 alphabar_T is about 0.35, so x_T would be far from pure noise.
        beta_schedule (`str`, defaults to `"linear"`):
            `"linear"` (the document's), `"squaredcos_cap_v2"` (the cosine schedule of Nichol & Dhariwal 2021,
            which ignores `beta_start` and `beta_end`), or diffusers' `"scaled_linear"` and `"sigmoid"`.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the model predicts: `"epsilon"` (the noise, as in the document), `"v_prediction"` or `"sample"`.
        variance_type (`str`, defaults to `"fixed_large"`):
            The reverse-step noise scale: `"fixed_large"` is the document's `sqrt(beta_t)`; `"fixed_small"` (or
            `"fixed_small_log"`, the same scale) is the posterior's `sqrt(beta_t (1 - alphabar_{t-1}) / (1 -
            alphabar_t))`, tighter on coarse chains. With `"learned"` or `"learned_range"` (Nichol & Dhariwal 2021)
            the model outputs twice the sample's channels: the prediction, then the variance itself or v in [-1, 1]
            interpolating the log-variance between the two fixed ones.
        clip_sample (`bool`, defaults to `False`):
            Clip the predicted x_0 to `[-clip_sample_range, clip_sample_range]` before the update. The document
            does not clip.
        clip_sample_range (`float`, defaults to 1.0):
            The clipping bound used when `clip_sample` is on.
        eta (`float`, *optional*):
            `None` (default) runs the document's update. A value in [0, 1] runs the DDIM update (Song et al. 2021,
            eq. 12) on the same chain instead: `x_{t-1} = sqrt(alphabar_{t-1}) x_0 + sqrt(1 - alphabar_{t-1} -
            sigma^2) eps + sigma z` with `sigma = eta * sqrt(beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t))`; 0 is
            deterministic, 1 equals the posterior-variance DDPM step. `variance_type` is then unused.
        trained_betas (`list[float]`, *optional*):
            The betas themselves, one per step, instead of a `beta_schedule`.
        thresholding (`bool`, defaults to `False`):
            Dynamic thresholding of the predicted x_0 (Saharia et al. 2022), instead of `clip_sample`.
        dynamic_thresholding_ratio (`float`, defaults to 0.995):
            The percentile of |x_0| that thresholding scales by.
        sample_max_value (`float`, defaults to 1.0):
            The largest threshold.
        timestep_spacing (`str`, defaults to `"linspace"`):
            How `set_timesteps(N)` picks N steps: `"linspace"` spreads them evenly from T-1 down to 0; diffusers'
            `"leading"` (its DDPMScheduler's default) takes multiples of T // N from 0, `"trailing"` counts down from
            T-1 by T / N (Lin et al. 2023, table 2).
        steps_offset (`int`, defaults to 0):
            Added to every step of a `"leading"` chain.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas so that alphabar_T is 0 (Lin et al. 2023); pair it with `v_prediction`.
    """

    # diffusers' schedulers that FaceDiffPipeline's loop (DDPMPipeline's: no input scaling) samples a model of
    # ours with, tested against DDPMPipeline: `pipeline.scheduler.compatibles` lists them.
    _compatibles = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_large",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        eta: float | None = None,
        trained_betas: list[float] | np.ndarray | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}.")
        if not 0.0 < beta_start < 1.0 or not 0.0 < beta_end < 1.0:
            raise ValueError(
                f"beta_start and beta_end must lie in (0, 1), got beta_start={beta_start}, beta_end={beta_end}."
            )
        if beta_end <= beta_start:
            raise ValueError(
                f"beta_end ({beta_end}) must be greater than beta_start ({beta_start}): betas grow over the chain."
            )
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}.")
        if eta is not None and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (or be None for the document's update), got {eta}.")

        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64)
            if betas.shape != (num_train_timesteps,) or not ((betas > 0) & (betas <= 1)).all():
                raise ValueError(
                    f"trained_betas must hold num_train_timesteps ({num_train_timesteps}) values in (0, 1], got "
                    f"{betas.size} values from {betas.min():g} to {betas.max():g}."
                )
        elif beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        elif beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        elif beta_schedule == "sigmoid":
            sigmoid = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, num_train_timesteps, dtype=np.float64)))
            betas = sigmoid * (beta_end - beta_start) + beta_start
        else:
            betas = _cosine_betas(num_train_timesteps)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = torch.from_numpy(betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        # sqrt(alphabar_t) and sqrt(1 - alphabar_t) per (device, dtype), made on first use: a copy to a GPU waits for
        # the device, so a training step that made them afresh would stall twice.
        self._scale_tables = {}

        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._previous_timestep = {t: t - 1 for t in range(num_train_timesteps)}

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """
        Choose the steps the sampler visits.

        By default the full chain T-1, ..., 0. With `num_inference_steps=N` the chain is respaced to N steps, which
        samples about T/N times faster: by default evenly spread from T-1 down to 0 (both included when N >= 2);
        `timestep_spacing` chooses diffusers' other spacings.

        Args:
            num_inference_steps (`int`, *optional*):
                N, between 1 and `num_train_timesteps`. `None` (and no `timesteps`) means the full chain.
            device (`str` or `torch.device`, *optional*):
                Where to put `self.timesteps`.
            timesteps (`list[int]`, *optional*):
                An explicit chain: strictly decreasing training steps in [0, T-1]. Excludes `num_inference_steps`.
        """
        num_train_timesteps = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either num_inference_steps or timesteps to set_timesteps, not both.")
        if timesteps is not None:
            chain = [int(t) for t in timesteps]
            if not chain or any(later >= earlier for earlier, later in itertools.pairwise(chain)):
                raise ValueError(f"timesteps must be a non-empty, strictly decreasing list, got {chain}.")
            if chain[0] >= num_train_timesteps or chain[-1] < 0:
                raise ValueError(
                    f"timesteps must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps - 1), got {chain}."
                )
        elif num_inference_steps is None:
            chain = list(range(num_train_timesteps - 1, -1, -1))
        else:
            problem = (
                f"num_inference_steps must be an integer between 1 and num_train_timesteps ({num_train_timesteps}), "
                f"got {num_inference_steps!r}."
            )
            try:  # any integer type: a Python int, a NumPy integer, a 0-d integer tensor
                num_inference_steps = operator.index(num_inference_steps)
            except TypeError:
                raise ValueError(problem) from None
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(problem)
            chain = self._spaced_chain(num_inference_steps)
            if chain[0] >= num_train_timesteps:
                raise ValueError(
                    f"steps_offset {self.config.steps_offset} puts the first of {num_inference_steps} steps at "
                    f"{chain[0]}, past num_train_timesteps - 1 ({num_train_timesteps - 1}): lower it or the steps."
                )

        self.num_inference_steps = len(chain)
        self.timesteps = torch.tensor(chain, dtype=torch.int64, device=device)
        self._previous_timestep = dict(zip(chain, chain[1:] + [-1], strict=True))

    def _spaced_chain(self, num_inference_steps: int) -> list[int]:
        """N steps by `timestep_spacing`, as DDPMScheduler.set_timesteps picks them."""
        num_train_timesteps, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "linspace":
            chain = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
        elif spacing == "leading":
            ratio = num_train_timesteps // num_inference_steps
            chain = (np.arange(0, num_inference_steps) * ratio).round()[::-1] + self.config.steps_offset
        else:
            chain = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps)) - 1
        return chain.astype(np.int64).tolist()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """
        DDPM feeds x_t to the model unscaled; this is the identity, for code written against any diffusers
        scheduler.

        Args:
            sample (`torch.Tensor`):
                The current sample x_t.
            timestep (`int`, *optional*):
                Unused.

        Returns:
            `torch.Tensor`: `sample`, unchanged.
        """
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Equation (3): `x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) z`, with one t per sample.

        Args:
            original_samples (`torch.Tensor`):
                x_0, a batch of clean samples.
            noise (`torch.Tensor`):
                z, standard normal noise of the same shape.
            timesteps (`torch.Tensor`):
                One training step in [0, T-1] per sample, on any device.

        Returns:
            `torch.Tensor`: x_t, with the dtype and device of `original_samples`.
        """
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._signal_and_noise_scales(timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        The v-prediction target `v = sqrt(alphabar_t) z - sqrt(1 - alphabar_t) x_0`.

        Args:
            sample (`torch.Tensor`):
                x_0, a batch of clean samples.
            noise (`torch.Tensor`):
                z, the noise that `add_noise` used.
            timesteps (`torch.Tensor`):
                One training step per sample.

        Returns:
            `torch.Tensor`: v, with the dtype and device of `sample`.
        """
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._signal_and_noise_scales(timesteps, sample)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        *,
        variance_noise: torch.Tensor | None = None,
    ) -> FaceDiffSchedulerOutput | tuple:
        """
        One reverse step of the document: x_t -> x_{t-1} (on a respaced chain, to the previous chosen step).

        Args:
            model_output (`torch.Tensor`):
                The model's output at (x_t, t), read according to `prediction_type`; from a model with a variance
                output, the prediction and the variance output concatenated along the channels (a fixed
                `variance_type` then samples with its own variance).
            timestep (`int` or `torch.Tensor`):
                t, one of `self.timesteps`.
            sample (`torch.Tensor`):
                x_t.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws z; a list gives one generator per sample.
            return_dict (`bool`, defaults to `True`):
                Return a [`FaceDiffSchedulerOutput`] rather than a tuple.
            variance_noise (`torch.Tensor`, *optional*):
                z itself, instead of drawing it. Keyword-only, so that a call written for `DDPMScheduler.step`
                (`generator`, then `return_dict`) means the same here.

        Returns:
            [`FaceDiffSchedulerOutput`] or `tuple`: `(prev_sample, pred_original_sample)`.
        """
        predicted_variance = None
        learned = self.config.variance_type in LEARNED_VARIANCES
        if model_output.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]:  # fixed variances ignore it
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        if model_output.shape != sample.shape:
            twice = " (twice the channels with a learned variance_type)" if learned else ""
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}: "
                f"the model must return one value per sample element{twice}."
            )
        t = int(timestep)
        if t not in self._previous_timestep:
            raise ValueError(
                f"timestep {t} is not in the current schedule ({len(self.timesteps)} steps from "
                f"{int(self.timesteps[0])} to {int(self.timesteps[-1])}): pass one of scheduler.timesteps."
            )
        prev_t = self._previous_timestep[t]
        alpha_prod_t = self.alphas_cumprod[t].item()
        alpha_prod_t_prev = self.alphas_cumprod[prev_t].item() if prev_t >= 0 else 1.0
        # On the full chain this is the configured beta_t itself; on a respaced one, the beta that keeps alphabar.
        beta_t = self.betas[t].item() if prev_t == t - 1 else 1.0 - alpha_prod_t / alpha_prod_t_prev
        alpha_t = 1.0 - beta_t

        pred_original_sample, pred_epsilon = self._original_and_noise(model_output, sample, alpha_prod_t)
        posterior_variance = beta_t * (1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t)
        if self.config.eta is None:
            if alpha_t > 0:
                prev_sample = (sample - beta_t / math.sqrt(1.0 - alpha_prod_t) * pred_epsilon) / math.sqrt(alpha_t)
            else:  # a zero-terminal-SNR chain's first step: the same update as the posterior mean it equals
                prev_sample = math.sqrt(alpha_prod_t_prev) * pred_original_sample
            std = self._noise_scale(beta_t, posterior_variance, predicted_variance)
        else:
            variance = self.config.eta**2 * posterior_variance
            direction = math.sqrt(max(1.0 - alpha_prod_t_prev - variance, 0.0))
            prev_sample = math.sqrt(alpha_prod_t_prev) * pred_original_sample + direction * pred_epsilon
            std = math.sqrt(variance)

        if prev_t >= 0 and (torch.is_tensor(std) or std > 0):
            if variance_noise is None:
                variance_noise = randn_tensor(
                    sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
                )
            prev_sample = prev_sample + std * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return FaceDiffSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """
        The step that follows `timestep` on the current chain.

        Args:
            timestep (`int` or `torch.Tensor`):
                One of `self.timesteps`.

        Returns:
            `int` or `torch.Tensor`: the next step down the chain, or -1 after the last step; typed as
            `DDPMScheduler`'s: `timestep - 1` before `set_timesteps`, a 0-d tensor after.
        """
        prev_t = self._previous_timestep[int(timestep)]
        return timestep - 1 if self.num_inference_steps is None else torch.tensor(prev_t)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _noise_scale(
        self, beta_t: float, posterior_variance: float, predicted_variance: torch.Tensor | None
    ) -> float | torch.Tensor:
        """The reverse step's noise scale for `variance_type`; a tensor when the model predicts it."""
        variance_type = self.config.variance_type
        if variance_type == "fixed_large":
            return math.sqrt(beta_t)
        if variance_type in ("fixed_small", "fixed_small_log"):
            return math.sqrt(posterior_variance)
        if predicted_variance is None:
            raise ValueError(
                f"variance_type {variance_type!r} needs the model's variance output: a UNet with twice the sample's "
                "channels (out_channels = 2 * in_channels)."
            )
        if variance_type == "learned":
            return predicted_variance.sqrt()
        # As DDPMScheduler: the log-variance between log(posterior variance), kept above 1e-20, and log(beta_t).
        min_log, max_log = math.log(max(posterior_variance, 1e-20)), math.log(beta_t)
        fraction = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (fraction * max_log + (1 - fraction) * min_log))

    def _original_and_noise(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 and eps consistent with x_t by (3), whatever the model predicts; clipping x_0 moves eps with it."""
        sqrt_alpha_prod = math.sqrt(alpha_prod_t)
        sqrt_one_minus_alpha_prod = math.sqrt(1.0 - alpha_prod_t)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_epsilon = model_output
            pred_original_sample = (sample - sqrt_one_minus_alpha_prod * pred_epsilon) / sqrt_alpha_prod
        elif prediction_type == "v_prediction":
            pred_original_sample = sqrt_alpha_prod * sample - sqrt_one_minus_alpha_prod * model_output
            pred_epsilon = sqrt_alpha_prod * model_output + sqrt_one_minus_alpha_prod * sample
        else:
            pred_original_sample = model_output
            pred_epsilon = (sample - sqrt_alpha_prod * pred_original_sample) / sqrt_one_minus_alpha_prod

        if self.config.thresholding:
            pred_original_sample = self._threshold(pred_original_sample)
            pred_epsilon = (sample - sqrt_alpha_prod * pred_original_sample) / sqrt_one_minus_alpha_prod
        elif self.config.clip_sample:
            bound = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-bound, bound)
            pred_epsilon = (sample - sqrt_alpha_prod * pred_original_sample) / sqrt_one_minus_alpha_prod
        return pred_original_sample, pred_epsilon

    def _threshold(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding: each sample's x_0 clamped to [-s, s] and divided by s, s its |x_0| percentile
        `dynamic_thresholding_ratio`, kept in [1, `sample_max_value`]."""
        flat = pred_original_sample.float().flatten(1)
        bound = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        bound = bound.clamp(min=1, max=self.config.sample_max_value)[:, None]
        thresholded = torch.maximum(torch.minimum(flat, bound), -bound) / bound
        return thresholded.reshape(pred_original_sample.shape).to(pred_original_sample.dtype)

    def _signal_and_noise_scales(
        self, timesteps: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alphabar_t) and sqrt(1 - alphabar_t) per sample, shaped to broadcast against `like`."""
        key = (like.device, like.dtype)
        if key not in self._scale_tables:
            # Rounded from float64 to the sample's dtype, then moved: no float64 on the device (MPS has none).
            tables = (self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt())
            self._scale_tables[key] = tuple(table.to(like.dtype).to(like.device) for table in tables)
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._scale_tables[key]
        index = torch.as_tensor(timesteps).to(like.device).long()
        broadcast_shape = (-1,) + (1,) * (like.ndim - 1)
        return sqrt_alpha_prod[index].reshape(broadcast_shape), sqrt_one_minus_alpha_prod[index].reshape(
            broadcast_shape
        )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, algorithm 1: shift and scale sqrt(alphabar) so that it ends at 0 and starts where it did."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    alpha_bar = ((root - last) * first / (first - last)) ** 2
    return 1.0 - np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, alphabar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas capped."""
    steps = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
