"""Every training option, defined once: `HfArgumentParser` turns it into command-line flags and reads YAML/JSON files.

Flag names follow diffusers' `examples/unconditional_image_generation/train_unconditional.py` where they overlap.
"""

import inspect
import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import yaml
from diffusers import UNet2DModel
from diffusers.optimization import SchedulerType
from transformers import HfArgumentParser
from transformers import SchedulerType as TransformersSchedulerType

from .data import ImageSource, ImageSourceError
from .unet_presets import UNET_PRESETS, unet_config

# diffusers' schedules, less piecewise_constant (it needs step rules that no flag passes: it would fail once training
# starts), and transformers' inverse_sqrt, a decay that needs no run length.
INVERSE_SQRT_SCHEDULE = TransformersSchedulerType.INVERSE_SQRT.value
LR_SCHEDULES = (
    *(schedule.value for schedule in SchedulerType if schedule != SchedulerType.PIECEWISE_CONSTANT),
    INVERSE_SQRT_SCHEDULE,
)
# The schedules that need no run length, so that a run bounded by --max_train_minutes alone can use them.
OPEN_ENDED_SCHEDULES = (SchedulerType.CONSTANT.value, SchedulerType.CONSTANT_WITH_WARMUP.value, INVERSE_SQRT_SCHEDULE)
UNET_DEFAULT_DOWN_BLOCKS = inspect.signature(UNet2DModel.__init__).parameters["down_block_types"].default
# What a run trains with where no flag says: the built-in digits (the main job) have a recipe of their own, measured
# in docs/recipes.md (the digits main job); other data start from the DDPM paper's rate and the document's loss.
MAIN_JOB_DEFAULTS = {"model_preset": "tiny", "train_batch_size": 32, "learning_rate": 1e-3, "snr_gamma": 5.0}
DEFAULTS = {"model_preset": "small", "train_batch_size": 64, "learning_rate": 2e-4, "snr_gamma": 0.0}
MAIN_JOB_STEPS = 3900


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainingArguments:
    # Data
    dataset_name: str | None = _help(
        "A Hub dataset id, a folder written by `datasets.Dataset.save_to_disk`, or a folder `datasets.load_dataset` "
        "reads (a clone of a Hub dataset repo). With neither this nor --train_data_dir, trains on scikit-learn's "
        "bundled handwritten digits.",
        default=None,
    )
    dataset_config_name: str | None = _help(
        "The configuration of --dataset_name, for a dataset that has several (`datasets.load_dataset`'s name).",
        default=None,
    )
    train_data_dir: str | None = _help(
        "A folder of images, read recursively as a `datasets` image folder.", default=None
    )
    image_column: str | None = _help(
        "The image column (Image, or image file paths); default: the dataset's first Image feature.", default=None
    )
    resolution: int | None = _help("Training resolution; default: 16 for the built-in digits, else 64.", default=None)
    center_crop: bool = _help("Center-crop to a square; default: a random crop, drawn once per image.", default=False)
    random_flip: bool = _help("Flip images horizontally at random, independently at every step.", default=False)
    preserve_input_precision: bool = _help(
        "Keep the levels of 16- and 32-bit grayscale images (stored as float32) instead of rounding them to 8 bits.",
        default=False,
    )
    num_channels: int | None = _help("1 or 3; default: 1 when every image is grayscale, else 3.", default=None)
    max_train_samples: int | None = _help("Train on this many images only (a seeded random subset).", default=None)
    dataloader_num_workers: int = _help("Worker processes that load batches (0: the main process).", default=0)
    cpu_threads: int | None = _help(
        "Threads per process when training on CPU; default: this machine's cores split between its processes "
        "(accelerate launch sets OMP_NUM_THREADS=1, which would leave cores idle).",
        default=None,
    )
    preprocessing_num_workers: int | None = _help(
        "Processes that decode and resize the images once, before training (the result is cached).", default=None
    )
    cache_dir: str | None = _help("Where `datasets` caches downloads and the preprocessed images.", default=None)

    # Model and diffusion
    model_preset: str | None = _help(
        f"UNet preset: {', '.join(UNET_PRESETS)}; default: tiny for the built-in digits (the main job), else small.",
        default=None,
    )
    model_config_name_or_path: str | None = _help(
        "A UNet2DModel config.json (or a folder holding one) to train from scratch instead of a preset.", default=None
    )
    pretrained_model_name_or_path: str | None = _help(
        "Fine-tune: a saved facediff pipeline or diffusers DDPMPipeline (a folder or Hub repo id) whose UNet weights "
        "(safetensors) and noise schedule the run starts from, the EMA too; --resolution defaults to the model's, "
        "and gray images are converted for an RGB model. Default: train from scratch.",
        default=None,
    )
    ddpm_num_steps: int = _help("T, the number of diffusion steps.", default=1000)
    ddpm_beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear", "sigmoid"] = _help(
        "Beta schedule: linear (the document's), or the cosine, scaled_linear or sigmoid schedules of diffusers.",
        default="linear",
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = _help(
        "What the UNet learns to predict.", default="epsilon"
    )
    snr_gamma: float | None = _help(
        "Min-SNR loss weighting gamma (Hang et al. 2023; 5.0 is typical); 0 turns it off: the document's unweighted "
        "loss. Default: 5 for the built-in digits (the main job), else off.",
        default=None,
    )
    variance_type: Literal["fixed_large", "fixed_small", "learned_range"] | None = _help(
        "The reverse step's variance: fixed_large (the document's beta_t), fixed_small (the posterior's), or "
        "learned_range, learned by the UNet with Improved DDPM's hybrid loss (twice the output channels); "
        "default: fixed_large, or the base's with --pretrained_model_name_or_path.",
        default=None,
    )
    clip_sample: bool | None = field(
        default=None,
        # A bare --clip_sample means true, as for the other switches, while "not given" stays distinguishable.
        metadata={
            "help": "Clip each sampling step's x_0 prediction to [-1, 1], as diffusers' DDPMScheduler does by default "
            "(the document's update does not clip). Saved in the pipeline's scheduler and used by the run's "
            "evaluations and sample grids; training is unchanged. Default: off, or the base's with "
            "--pretrained_model_name_or_path.",
            "nargs": "?",
            "const": True,
        },
    )

    # Optimisation
    output_dir: str = _help("Where the pipeline, checkpoints, samples and logs go.", default="facediff-output")
    overwrite_output_dir: bool = _help("Train into an output_dir that holds another run.", default=False)
    seed: int = _help("Seed for weights, data order, noise and sample grids.", default=0)
    train_batch_size: int | None = _help(
        "Global batch size: images per optimizer step before accumulation, split between the processes; default: 32 "
        "for the built-in digits (the main job), else 64.",
        default=None,
    )
    num_epochs: int | None = _help(
        "Passes over the data (ignored when --max_train_steps is given); default: 100, or 3,900 steps on the "
        "built-in digits (the main job).",
        default=None,
    )
    max_train_steps: int | None = _help("Optimizer steps to train; overrides --num_epochs.", default=None)
    max_train_minutes: float | None = _help(
        "Stop after this many minutes of training, at the end of the step that reaches them, and save the pipeline "
        "as at the end of a run; with --max_train_steps or --num_epochs as well, whichever comes first. "
        "Evaluations, sample grids and checkpoints do not count; a resumed run's earlier minutes do. Suits a "
        "schedule that needs no run length (--lr_scheduler constant_with_warmup or inverse_sqrt), which a stop at any "
        "step does not cut short.",
        default=None,
    )
    gradient_accumulation_steps: int = _help("Batches accumulated per optimizer step.", default=1)
    learning_rate: float | None = _help(
        "Peak learning rate; default: 1e-3 for the built-in digits (the main job), else 2e-4.", default=None
    )
    lr_scheduler: str = _help(
        "diffusers.optimization schedule (constant, constant_with_warmup, linear, cosine, ...) or inverse_sqrt "
        "(transformers': the rate falls as 1/sqrt(step) after the warm-up, its timescale the warm-up steps).",
        default="cosine",
    )
    lr_warmup_steps: int = _help("Linear warm-up steps.", default=100)
    adam_beta1: float = _help("AdamW beta1.", default=0.95)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_weight_decay: float = _help("AdamW weight decay.", default=1e-6)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables it).", default=1.0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _help(
        "Mixed precision. auto: what `accelerate launch --mixed_precision` or `accelerate config` asks for, else "
        "bf16 where the CPU or GPU computes bfloat16 natively (AMX, AVX512-BF16, recent GPUs) and no elsewhere.",
        default="auto",
    )
    use_ema: bool = _help("Keep an exponential moving average of the weights and save it.", default=True)
    ema_inv_gamma: float = _help("EMA warm-up inverse gamma.", default=1.0)
    ema_power: float = _help("EMA warm-up power.", default=0.75)
    ema_max_decay: float = _help("EMA maximum decay.", default=0.9999)

    # Checkpoints, samples, logs
    checkpointing_steps: int = _help("Save a resumable checkpoint every this many steps.", default=500)
    checkpoints_total_limit: int | None = _help("Keep at most this many checkpoints.", default=None)
    resume_from_checkpoint: str | None = _help(
        'A checkpoint folder, or "latest". Every run ends with a checkpoint, so the same command with a larger '
        "--max_train_steps, --num_epochs or --max_train_minutes extends a finished run; a decaying --lr_scheduler is "
        "then stretched to the new length (as diffusers' train_unconditional.py does), so the rate rises again.",
        default=None,
    )
    save_images_steps: int = _help("Save a sample grid every this many steps (and at the end).", default=500)
    save_images_epochs: int | None = _help(
        "Also save a sample grid at the end of every this many epochs, from the first (diffusers' example's flag).",
        default=None,
    )
    save_model_epochs: int | None = _help(
        "Also save the pipeline (EMA weights) into --output_dir at the end of every this many epochs, from the first, "
        "so that an unfinished run can be sampled; the finished run's pipeline replaces it, and only that is pushed.",
        default=None,
    )
    eval_batch_size: int = _help("Images in each sample grid.", default=16)
    num_inference_steps: int = field(
        default=100,
        metadata={
            "help": "Sampling steps for the sample grids (respaced).",
            "aliases": ["--ddpm_num_inference_steps"],  # diffusers' example's name for it
        },
    )
    eval_steps: int | None = _help(
        "Evaluate the model every this many steps and at the end: --eval_num_images samples scored against the "
        "training images (pixel-PCA FD and KID, and the share of samples that copy a training image), logged and "
        "written to eval_log.jsonl; default: no evaluation.",
        default=None,
    )
    eval_num_images: int = _help("Samples per evaluation, drawn with fixed seeds.", default=64)
    eval_inference_steps: int = _help("Sampling steps per evaluation (respaced).", default=25)
    save_best: bool = _help(
        "Save the weights of the evaluation with the lowest pixel-PCA KID, among those without the memorisation "
        "warning, rather than the last ones; needs --eval_steps.",
        default=False,
    )
    logger: Literal["tensorboard", "wandb"] = _help("Where losses and sample grids are logged.", default="tensorboard")
    logging_dir: str = _help("Log folder, relative to output_dir.", default="logs")

    # Hub
    push_to_hub: bool = _help("Upload the final pipeline to the Hub.", default=False)
    hub_model_id: str | None = _help("Hub repo id; default: the output folder's name.", default=None)
    hub_private_repo: bool = _help("Create the Hub repo as private.", default=False)
    hub_token: str | None = _help(
        "Refused: a token on the command line lands in the shell history and the saved arguments. Log in with "
        "`hf auth login` or set HF_TOKEN.",
        default=None,
    )

    # Accepted for diffusers' train_unconditional.py
    enable_xformers_memory_efficient_attention: bool = _help(
        "Attention through xformers where it is installed and the model is on a GPU; otherwise PyTorch's "
        "scaled_dot_product_attention, which diffusers uses by default and which saves the same memory.",
        default=False,
    )
    local_rank: int = _help("Set by launchers; Accelerate reads the process's rank from LOCAL_RANK itself.", default=-1)

    def __post_init__(self):
        for name, value in (MAIN_JOB_DEFAULTS if self.uses_builtin_digits else DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.hub_token is not None:
            raise ValueError(
                "--hub_token is refused: a token on the command line lands in the shell history and in this run's "
                "saved arguments. Log in once with `hf auth login`, or set the HF_TOKEN environment variable."
            )
        if self.dataset_name and self.train_data_dir:
            raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
        if self.dataset_config_name is not None and self.dataset_name is None:
            raise ValueError(
                f"--dataset_config_name {self.dataset_config_name} chooses a configuration of --dataset_name, which is "
                "not given: pass --dataset_name too, or drop --dataset_config_name."
            )
        if self.num_channels not in (None, 1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}.")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "save_images_steps",
            "eval_batch_size",
            "num_inference_steps",
            "eval_inference_steps",
            "ddpm_num_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in (
            "num_epochs",
            "max_train_steps",
            "max_train_samples",
            "checkpoints_total_limit",
            "cpu_threads",
            "eval_steps",
            "save_images_epochs",
            "save_model_epochs",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"--max_train_minutes must be positive, got {self.max_train_minutes}.")
        if self.max_train_minutes is not None and self.max_train_steps is None and self.num_epochs is None:
            if self.lr_scheduler not in OPEN_ENDED_SCHEDULES:
                raise ValueError(
                    f"--lr_scheduler {self.lr_scheduler} decays over the run's steps, and --max_train_minutes alone "
                    "sets none: pass --lr_scheduler constant_with_warmup or inverse_sqrt, or --max_train_steps as well."
                )
        if self.eval_num_images < 2:
            raise ValueError(f"--eval_num_images must be at least 2, got {self.eval_num_images}.")
        if self.save_best and self.eval_steps is None:
            raise ValueError(
                "--save_best keeps the best evaluation's weights, but nothing is evaluated without --eval_steps: "
                "pass --eval_steps N, or drop --save_best."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.snr_gamma < 0:
            raise ValueError(f"--snr_gamma must be positive, or 0 for the unweighted loss; got {self.snr_gamma}.")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ValueError(f"--lr_scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULES)}.")
        if self.pretrained_model_name_or_path is not None and self.variance_type == "learned_range":
            raise ValueError(
                "--variance_type learned_range needs a UNet with a variance output, which "
                "--pretrained_model_name_or_path's model lacks: fine-tune with a fixed variance, or train from scratch."
            )
        if self.pretrained_model_name_or_path is not None and self.model_config_name_or_path is not None:
            raise ValueError(
                "--pretrained_model_name_or_path fine-tunes that model's UNet and --model_config_name_or_path builds "
                "a new one: pass one of them."
            )
        config = self.model_config_name_or_path
        if config is not None and not (Path(config).is_file() or (Path(config) / "config.json").is_file()):
            raise ValueError(
                f"--model_config_name_or_path {config} is neither a config.json nor a folder holding one: "
                "pass a UNet2DModel config, or --model_preset instead."
            )
        if config is not None:
            _check_unet_config(config, self.effective_resolution)
        if self.num_inference_steps > self.ddpm_num_steps:
            raise ValueError(
                f"--num_inference_steps ({self.num_inference_steps}) cannot exceed --ddpm_num_steps "
                f"({self.ddpm_num_steps})."
            )
        if self.eval_steps is not None and self.eval_inference_steps > self.ddpm_num_steps:
            raise ValueError(
                f"--eval_inference_steps ({self.eval_inference_steps}) cannot exceed --ddpm_num_steps "
                f"({self.ddpm_num_steps})."
            )
        if self.model_config_name_or_path is None and self.pretrained_model_name_or_path is None:
            unet_config(self.model_preset, self.effective_resolution, self.num_channels or 1)

    @property
    def learns_variance(self) -> bool:
        return self.variance_type == "learned_range"

    @property
    def uses_builtin_digits(self) -> bool:
        return self.dataset_name is None and self.train_data_dir is None

    @property
    def effective_resolution(self) -> int:
        if self.resolution is not None:
            return self.resolution
        return default_resolution(self.dataset_name, self.train_data_dir)

    def image_source(self) -> ImageSource:
        """What the data layer reads for this run."""
        return ImageSource(
            location=self.train_data_dir or self.dataset_name,
            is_image_folder=self.train_data_dir is not None,
            config_name=self.dataset_config_name,
            preserve_precision=self.preserve_input_precision,
            image_column=self.image_column,
            resolution=self.effective_resolution,
            center_crop=self.center_crop,
            cache_dir=self.cache_dir,
            limit=self.max_train_samples,
            seed=self.seed,
            num_workers=self.preprocessing_num_workers,
        )

    def name_data_flags(self, error: ImageSourceError) -> str:
        """The data layer's message with this run's flag names in it."""
        location = "--train_data_dir" if self.train_data_dir is not None else "--dataset_name"
        return error.naming(location=location, image_column="--image_column")

    def total_train_steps(self, steps_per_epoch: int) -> int | None:
        """Optimizer steps this run trains for, given the steps in one epoch; None when only --max_train_minutes
        bounds it."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        if self.num_epochs is None and self.max_train_minutes is not None:
            return None
        if self.num_epochs is None and self.uses_builtin_digits:
            return MAIN_JOB_STEPS
        return (self.num_epochs or 100) * steps_per_epoch

    def in_effect(self, channels: int) -> "TrainingArguments":
        """These settings with the resolution and channel count resolved: what a run saves, so that resuming with
        a default spelt out (or left out) is the same run."""
        return replace(self, resolution=self.effective_resolution, num_channels=channels)

    def to_dict(self) -> dict:
        return asdict(self)


def default_resolution(dataset_name: str | None, train_data_dir: str | None) -> int:
    """The resolution a run trains at without --resolution: 16 for the built-in digits, else 64."""
    return 16 if dataset_name is None and train_data_dir is None else 64


def _check_unet_config(path: str, resolution: int) -> None:
    """Refuse a config that is not a UNet2DModel's, or whose downsampling does not divide the resolution, before
    training rather than at the first forward pass."""
    config = UNet2DModel.load_config(path)
    class_name = config.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name  # a pipeline's [module, class]
    if class_name not in (None, "UNet2DModel") or "in_channels" not in config:
        what = f"is a {class_name} config" if class_name not in (None, "UNet2DModel") else "has no in_channels"
        raise ValueError(
            f"--model_config_name_or_path {path} {what}, not a UNet2DModel config: pass a UNet2DModel config.json "
            "or the folder holding one, such as a saved pipeline's unet/ folder."
        )
    down_blocks = config.get("down_block_types", UNET_DEFAULT_DOWN_BLOCKS)
    downsampling = 2 ** (len(down_blocks) - 1)  # every down block but the last halves the image
    if resolution % downsampling or resolution < downsampling:
        lower = resolution - resolution % downsampling
        sizes = " or ".join(str(size) for size in (lower, lower + downsampling) if size >= downsampling)
        raise ValueError(
            f"resolution {resolution} is not a multiple of {downsampling}, the downsampling of the UNet in "
            f"--model_config_name_or_path {path} ({len(down_blocks)} down blocks): pass --resolution {sizes}."
        )


def parse_training_arguments(argv: list[str] | None = None) -> TrainingArguments:
    """
    Read the training arguments from the command line, or from a YAML or JSON file given first, followed by any
    flags, which override or extend the file's settings (`run.yaml --resume_from_checkpoint latest`).

    Args:
        argv (`list[str]`, *optional*):
            The arguments; default: `sys.argv[1:]`.

    Returns:
        `TrainingArguments`
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        # Through the flags, so that a file's values are converted and checked exactly as the command line's are
        # (YAML reads 1e-4 as a string; a value outside a flag's choices is refused). The flags after the file come
        # last, so they win: a stopped run resumes with the same command plus --resume_from_checkpoint latest.
        settings = _read_config_file(Path(argv[0]))
        argv = [f"--{name}={value}" for name, value in settings.items() if value is not None] + argv[1:]
    arguments, unknown = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(f"Unknown argument(s) {' '.join(unknown)}: `train_accelerate.py --help` lists the flags.")
    return arguments


def _read_config_file(path: Path) -> dict:
    try:
        settings = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        problem = " ".join(str(error).split())
        language = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path} is not valid {language} ({problem}): fix the file.") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must map setting names to values, one per line, e.g. `learning_rate: 0.0001`.")
    if settings.get("mixed_precision") is False:
        settings["mixed_precision"] = "no"  # YAML 1.1 reads an unquoted `no` as false
    unknown = sorted(set(settings) - {spec.name for spec in fields(TrainingArguments)})
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {', '.join(unknown)}: the names are the flags' without the leading --, "
            "as `train_accelerate.py --help` lists them."
        )
    return settings
