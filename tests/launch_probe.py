"""Runs train_accelerate.py as `accelerate launch` would, recording what each process did, for tests/test_ddp.py.

    accelerate launch ... tests/launch_probe.py RECORD_DIR [training flags]

Writes RECORD_DIR/rank<N>.json: a hash of the process's final weights, the images of every batch it trained on,
and every file or folder it created or wrote from Python under the output folder (safetensors and torch.save
write from native code, unseen: the test counts those files instead).
"""

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import facediff.training as training

record_dir = Path(sys.argv[1])
sys.argv = [str(Path(__file__).resolve().parents[1] / "train_accelerate.py"), *sys.argv[2:]]
output_dir = str(Path(sys.argv[sys.argv.index("--output_dir") + 1]).resolve())
rank = int(os.environ.get("RANK", "0"))
record = {"batches": [], "writes": []}


def audit(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing and _inside_output(path):
            record["writes"].append(os.path.relpath(os.path.abspath(path), output_dir))
    elif event in ("os.mkdir", "os.rename") and isinstance(args[0], (str, os.PathLike)) and _inside_output(args[0]):
        record["writes"].append(os.path.relpath(os.path.abspath(args[0]), output_dir))


def _inside_output(path) -> bool:
    return os.path.abspath(path).startswith(output_dir + os.sep)


sys.addaudithook(audit)
original_loss, original_train = training._diffusion_loss, training.train


def recording_loss(unet, scheduler, pixels, args):
    record["batches"].append([hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in pixels])
    return original_loss(unet, scheduler, pixels, args)


def recording_train(args):
    result = original_train(args)
    weights = b"".join(tensor.detach().numpy().tobytes() for tensor in result.unet.state_dict().values())
    record["weights"] = hashlib.sha256(weights).hexdigest()
    record["global_step"] = result.global_step
    return result


training._diffusion_loss = recording_loss
training.train = recording_train
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))
