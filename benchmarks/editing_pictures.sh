#!/usr/bin/env bash
# The pictures of docs/editing.md: `facediff inpaint`, `edit` and `interpolate` on a trained Olivetti model, on faces
# of the Olivetti folder (its only split, so faces the model trained on), each command's strip.png stacked into one
# picture per use and scaled 3x (nearest neighbour) for the page.
#
#     bash benchmarks/editing_pictures.sh MODEL OLIVETTI_TRAIN_FOLDER [WORK_DIR]
#
# MODEL is a facediff Olivetti pipeline folder (configs/olivetti-32.yaml); WORK_DIR (default: editing-pictures) gets
# the masks, the degraded faces, every command's output and log. The pictures go to docs/images/olivetti-32-*.png.
set -euo pipefail
model=$1
faces=$2
work=${3:-editing-pictures}
mkdir -p "$work"
export HF_HUB_OFFLINE=1

# The masks (white: repaint) at the faces' 64x64, and a blurred and a noisy copy of one face.
python3 - "$faces" "$work" <<'EOF'
import sys
import numpy as np
from PIL import Image, ImageFilter
faces, work = sys.argv[1:]
for name, box in {"eyes": (6, 18, 58, 32), "mouth": (16, 38, 48, 52)}.items():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, box)
    mask.save(f"{work}/mask-{name}.png")
face = Image.open(f"{faces}/210.png").convert("L")
face.filter(ImageFilter.GaussianBlur(3)).save(f"{work}/blurred.png")
noise = np.random.default_rng(0).normal(0, 50, (64, 64))
Image.fromarray(np.clip(np.asarray(face, dtype=float) + noise, 0, 255).astype(np.uint8)).save(f"{work}/noisy.png")
EOF

for index in 000 045 130 300; do
    for region in eyes mouth; do
        facediff inpaint "$model" --image "$faces/$index.png" --mask "$work/mask-$region.png" --steps 250 \
            --seed 0 --out "$work/inpaint-$index-$region" --overwrite 2>"$work/inpaint-$index-$region.log"
    done
done
for degraded in blurred noisy; do
    facediff edit "$model" --image "$work/$degraded.png" --strength 0.3 0.5 0.7 --steps 250 --seed 0 \
        --out "$work/edit-$degraded" --overwrite 2>"$work/edit-$degraded.log"
done
facediff interpolate "$model" --image "$faces/045.png" --image "$faces/300.png" --frames 8 --steps 100 \
    --out "$work/interpolate-faces" --overwrite 2>"$work/interpolate-faces.log"
facediff interpolate "$model" --seeds 0 1 --frames 8 --steps 100 \
    --out "$work/interpolate-seeds" --overwrite 2>"$work/interpolate-seeds.log"

python3 - "$work" <<'EOF'
import sys
from PIL import Image
work = sys.argv[1]

def stack(strips, path, scale=3):
    images = [Image.open(f"{work}/{strip}/strip.png") for strip in strips]
    width = max(image.width for image in images)
    sheet = Image.new("L", (width, sum(image.height for image in images)), 255)
    top = 0
    for image in images:
        sheet.paste(image.convert("L"), (0, top))
        top += image.height
    sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST).save(path)

stack([f"inpaint-{i}-{r}" for i in ("000", "045", "130", "300") for r in ("eyes", "mouth")],
      "docs/images/olivetti-32-inpaint.png")
stack(["edit-blurred", "edit-noisy"], "docs/images/olivetti-32-edit.png")
stack(["interpolate-faces", "interpolate-seeds"], "docs/images/olivetti-32-interpolate.png")
EOF
echo "Wrote docs/images/olivetti-32-inpaint.png, olivetti-32-edit.png and olivetti-32-interpolate.png"
