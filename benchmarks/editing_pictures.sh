#!/usr/bin/env bash
# The pictures of docs/editing.md: `facediff inpaint`, `edit` and `interpolate` on a trained Olivetti model, on faces
# of the Olivetti folder (its only split, so faces the model trained on), each command's strip.png stacked into one
# picture per use (with the clean face before the edited one's strip, and the two faces at the ends of their
# interpolation, as the model sees them) and scaled 3x (nearest neighbour) for the page.
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
for name, box in {"eyes": (6, 12, 58, 28), "mouth": (16, 41, 48, 56)}.items():
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
            --num-images 2 --seed 0 --out "$work/inpaint-$index-$region" --overwrite \
            2>"$work/inpaint-$index-$region.log"
    done
done
for degraded in blurred noisy; do
    facediff edit "$model" --image "$work/$degraded.png" --strength 0.1 0.2 0.3 0.5 0.7 --steps 250 --seed 0 \
        --out "$work/edit-$degraded" --overwrite 2>"$work/edit-$degraded.log"
done
facediff interpolate "$model" --image "$faces/045.png" --image "$faces/300.png" --frames 8 --steps 100 \
    --out "$work/interpolate-faces" --overwrite 2>"$work/interpolate-faces.log"
facediff interpolate "$model" --seeds 0 1 --frames 8 --steps 100 \
    --out "$work/interpolate-seeds" --overwrite 2>"$work/interpolate-seeds.log"

python3 - "$work" "$faces" <<'EOF'
import sys
from PIL import Image
from facediff.data import to_pixels
work, faces = sys.argv[1:]

def face(path):
    """A face as the model sees it."""
    return Image.fromarray(to_pixels(Image.open(path), 1, 32)[0])

def stack(rows, path, scale=3):
    """Rows of images (or image paths), left-aligned on white, scaled for the page."""
    rows = [[Image.open(item) if isinstance(item, str) else item for item in row] for row in rows]
    width = max(sum(image.width for image in row) for row in rows)
    sheet = Image.new("L", (width, sum(max(image.height for image in row) for row in rows)), 255)
    top = 0
    for row in rows:
        left = 0
        for image in row:
            sheet.paste(image.convert("L"), (left, top))
            left += image.width
        top += max(image.height for image in row)
    sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST).save(path)

stack([[f"{work}/inpaint-{i}-{r}/strip.png"] for i in ("000", "045", "130", "300") for r in ("eyes", "mouth")],
      "docs/images/olivetti-32-inpaint.png")
clean = face(f"{faces}/210.png")
stack([[clean, f"{work}/edit-{d}/strip.png"] for d in ("blurred", "noisy")], "docs/images/olivetti-32-edit.png")
blank = Image.new("L", (32, 32), 255)
stack([[face(f"{faces}/045.png"), f"{work}/interpolate-faces/strip.png", face(f"{faces}/300.png")],
       [blank, f"{work}/interpolate-seeds/strip.png", blank]], "docs/images/olivetti-32-interpolate.png")
EOF
echo "Wrote docs/images/olivetti-32-inpaint.png, olivetti-32-edit.png and olivetti-32-interpolate.png"
