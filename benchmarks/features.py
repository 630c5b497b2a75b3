"""Throughput of the Inception feature extractor on CPU, per execution mode.

Real Fashion-MNIST test images (28x28 gray -> RGB 299x299, as ``condnoise evaluate`` feeds
them). Each mode is checked against the eager NCHW features of the same images (max
relative error) before it is timed; the table gives images per second (median of repeats).

    python benchmarks/features.py                      # modes x batch sizes, ~3 min on 2 cores
    python benchmarks/features.py --modes eager --batch 32 --images 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median, time_repeats  # noqa: E402

MODES = ("eager", "channels-last", "frozen")


def build(mode: str) -> torch.nn.Module:
    """A fresh copy of the network per mode (modes convert weights in place)."""
    from condnoise.evaluation.features import inception_path

    layers = torch.jit.load(str(inception_path()), map_location="cpu").eval().net.layers
    if mode == "frozen":
        return torch.jit.optimize_for_inference(torch.jit.freeze(layers))
    if mode == "channels-last":
        return layers.to(memory_format=torch.channels_last)
    return layers


def run(mode: str, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from condnoise.evaluation.features import inception_input

    x = inception_input(x)
    if mode == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return net(x).reshape(len(x), -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}")
    ap.add_argument("--batch", default="32,64", help="comma-separated batch sizes")
    ap.add_argument("--images", type=int, default=128, help="images per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/features_cpu.json", help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from condnoise.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    x_all = torch.from_numpy(images[: args.images, None].copy()).float()
    reference = run("eager", build("eager"), x_all[:16])
    rows = []
    for mode in args.modes.split(","):
        net = build(mode)
        err = float((run(mode, net, x_all[:16]) - reference).abs().max() / reference.abs().max())
        for bs in (int(b) for b in args.batch.split(",")):
            batches = [x_all[s : s + bs] for s in range(0, args.images, bs)]

            def once(_: int, net=net, mode=mode, batches=batches) -> None:
                for b in batches:
                    run(mode, net, b)

            sec = median(time_repeats(once, torch.device("cpu"), warmup=1, repeats=args.repeats))
            rows.append({"mode": mode, "batch": bs, "images_per_s": args.images / sec,
                         "max_rel_err_vs_eager": err})
            print(f"{mode:14s} batch {bs:4d}: {args.images / sec:7.2f} img/s  "
                  f"(max rel err vs eager {err:.1e})", flush=True)
    base = next((r["images_per_s"] for r in rows if r["mode"] == "eager"), None)
    print("\n| mode | batch | img/s | vs eager | max rel err |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else ""
        print(f"| {r['mode']} | {r['batch']} | {r['images_per_s']:.2f} | {ratio} | "
              f"{r['max_rel_err_vs_eager']:.1e} |")
    out = {"benchmark": "features", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": platform.platform(), "processor": platform.processor(),
           "threads": args.threads, "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
