"""Quality against training time: a facediff recipe and the plain diffusers loop, trained for the same minutes.

    python benchmarks/quality_vs_time.py configs/olivetti-32.yaml \
        --train_data_dir ../shared/datasets/olivetti-faces/train --minutes 2.5 5 10 15 --out quality-olivetti
    python benchmarks/quality_vs_time.py --minutes 2.5 5 8 --out quality-digits      # the main job

Runs `stock_loop.py` (the plain diffusers loop) and then the recipe, `train_accelerate.py CONFIG` with
`--max_train_minutes` at the last mark (with neither a config nor --train_data_dir: the main job, its own steps on
the built-in digits, against the plain loop with its UNet and no flips), and its evaluations (`--eval_steps`) made as
the stock loop's: --num-images samples at --steps respaced steps, fixed seeds, EMA weights, scored against the
training images. Both clocks count training only, not evaluating. Prints a markdown table (each loop at the last
evaluation at or before each mark, and what the recipe's --save_best would keep if stopped there: its best evaluation
so far) and draws OUT/quality_vs_time.png, with the three floors of `kid_floor.py` (--floor-draws draws of as many
real images; each refits the held-out floor's evaluator, about 25 s at 64x64 RGB on 2 cores, so use a few there); a
stock.jsonl already in OUT with every mark is reused, and --replot trains nothing. Flags after `--` go to the
recipe's run (`-- --mixed_precision no`).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from kid_floor import floors, training_pixels
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from model_flags import describe_cpu

from facediff.digits import digits_image_folder
from facediff.training_args import MAIN_JOB_DEFAULTS
from facediff.training_evaluation import is_better

HERE = Path(__file__).resolve().parent


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def at_mark(records: list[dict], minutes_key: str, mark: float) -> dict | None:
    """The last record at or before `mark` minutes of training (a small tolerance for the clock's granularity)."""
    before = [record for record in records if record[minutes_key] <= mark + 0.05]
    return before[-1] if before else None


def best_before(records: list[dict], minutes_key: str, mark: float) -> dict | None:
    """What a run with --save_best saves when stopped at `mark`: its best evaluation so far."""
    best = None
    for record in records:
        if record[minutes_key] <= mark + 0.05 and is_better(record, best):
            best = record
    return best


def cell(record: dict | None, minutes_key: str) -> str:
    if record is None:
        return "n/a | |"
    return (
        f"{record['step']} ({record[minutes_key]:.1f} min) | {record['pixel_pca_kid_mean']:.4f} ± "
        f"{record['pixel_pca_kid_std']:.4f} | {record['memorised_share']:.1%}"
    )


def plot(stock: list[dict], recipe: list[dict], real: dict, name: str, path: Path) -> None:
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for records, key, label in ((stock, "minutes", "plain diffusers loop"), (recipe, "train_minutes", name)):
        axes.errorbar(
            [record[key] for record in records],
            [record["pixel_pca_kid_mean"] for record in records],
            yerr=[record["pixel_pca_kid_std"] for record in records],
            marker="o",
            markersize=3,
            capsize=2,
            label=label,
        )
    for (floor, (mean, std)), color in zip(real.items(), ("green", "gray", "purple"), strict=True):
        axes.axhspan(mean - 2 * std, mean + 2 * std, color=color, alpha=0.2, label=f"real images {floor} (± 2 std)")
    axes.set_yscale("symlog", linthresh=0.01)
    axes.set(xlabel="minutes of training", ylabel="pixel-PCA KID vs training images")
    axes.set_title(describe_cpu(), fontsize=8)
    axes.legend()
    figure.savefig(path, format="png", dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="the recipe, a YAML file of training settings; default: the main job")
    parser.add_argument("--train_data_dir", default=None, help="default: the built-in digits")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5, 10, 15])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="respaced sampling steps of each evaluation")
    parser.add_argument("--eval-steps", type=int, default=200, help="training steps between the recipe's evaluations")
    parser.add_argument("--out", required=True, help="a folder for both runs, the table's data and the plot")
    parser.add_argument("--replot", action="store_true", help="train nothing: table and plot from the runs in OUT")
    parser.add_argument(
        "--floor-draws", type=int, default=50, help="draws of real images for the floors (each refits the held-out one)"
    )
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, recipe_flags = parser.parse_args(argv[:split]), argv[split + 1 :]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    marks = sorted(args.minutes)
    if args.config is None and args.train_data_dir is None:  # the main job and its data
        train_data_dir, resolution, name = str(digits_image_folder()), "16", "main job"
        # The main job trains its steps (MAIN_JOB_STEPS), however long they take here.
        recipe_args, stock_args = [], ["--model_preset", MAIN_JOB_DEFAULTS["model_preset"], "--no-random-flip"]
    elif args.config is not None and args.train_data_dir is not None:
        train_data_dir, name = args.train_data_dir, Path(args.config).stem
        resolution = str(yaml.safe_load(Path(args.config).read_text()).get("resolution", 32))
        stock_args = ["--train_data_dir", train_data_dir]
        recipe_args = [args.config, *stock_args, "--max_train_minutes", str(marks[-1])]
    else:
        parser.error("pass a recipe and its --train_data_dir, or neither (the main job)")

    stock_path, recipe_dir = out / "stock.jsonl", out / "recipe"
    if not args.replot and not (
        stock_path.is_file() and {row.get("minutes") for row in read_jsonl(stock_path)} >= set(marks)
    ):
        stock_command = [
            sys.executable, str(HERE / "stock_loop.py"), *stock_args, "--resolution", resolution,
            "--minutes", *map(str, marks), "--num-images", str(args.num_images),
            "--steps", str(args.steps), "--out", str(stock_path),
        ]  # fmt: skip
        subprocess.run(stock_command, check=True)
    recipe_command = [
        sys.executable, str(HERE.parent / "train_accelerate.py"), *recipe_args, "--output_dir", str(recipe_dir),
        "--overwrite_output_dir",
        "--eval_steps", str(args.eval_steps), "--eval_num_images", str(args.num_images),
        "--eval_inference_steps", str(args.steps), *recipe_flags,
    ]  # fmt: skip
    if not args.replot:
        subprocess.run(recipe_command, check=True)

    _, *stock = read_jsonl(stock_path)
    recipe = read_jsonl(recipe_dir / "eval_log.jsonl")
    real = {
        floor: scores["kid"]
        for floor, scores in floors(
            training_pixels(train_data_dir, int(resolution)), args.num_images, args.floor_draws
        ).items()
    }
    print(f"{describe_cpu()}; {args.num_images} samples at {args.steps} steps against the training images")
    for floor, (mean, std) in real.items():
        print(f"real images {floor}: pixel-PCA KID {mean:.4f} ± {std:.4f} (mean + 2 std: {mean + 2 * std:.4f})")
    print(f"| minutes | stock step | stock KID | stock memorised | {name} step | {name} KID | {name} memorised "
          f"| {name} saved: step | KID | memorised |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mark in marks:
        print(f"| {mark:g} | {cell(at_mark(stock, 'minutes', mark), 'minutes')} | "
              f"{cell(at_mark(recipe, 'train_minutes', mark), 'train_minutes')} | "
              f"{cell(best_before(recipe, 'train_minutes', mark), 'train_minutes')} |")  # fmt: skip
    plot(stock, recipe, real, name, out / "quality_vs_time.png")
    print(f"plot: {out / 'quality_vs_time.png'}")


if __name__ == "__main__":
    main()
