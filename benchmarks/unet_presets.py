"""Parameters and forward GFLOPs of the UNet presets: the table in facediff/unet_presets.py and the README.

python benchmarks/unet_presets.py
"""

import argparse

from facediff.unet_presets import PRESET_TABLE, build_unet, forward_gflops


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| preset | resolution | channels | parameters | forward GFLOPs |")
    print("|--------|-----------:|---------:|-----------:|---------------:|")
    for preset, resolution, channels in PRESET_TABLE:
        unet = build_unet(preset, resolution, channels)
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        print(f"| {preset:<6} | {resolution:<10} | {channels:<8} | {params:.2f}M | {forward_gflops(unet):.3g} |")


if __name__ == "__main__":
    main()
