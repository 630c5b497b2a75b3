"""CLI: ``condnoise features train`` and ``condnoise evaluate`` (paper §5)."""

from __future__ import annotations

import argparse
from pathlib import Path

from condnoise.app.common import (
    add_group_parser,
    add_parser,
    add_progress_option,
    float_range,
    int_range,
    positive_int,
    seed_int,
    show_progress,
    split_list,
)
from condnoise.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_features(subparsers)
    _register_evaluate(subparsers)


NETWORKS = ("fmnist-classifier", "scenes-recognizer", "scenes-clip")


def _register_features(subparsers: argparse._SubParsersAction) -> None:
    _, fsub = add_group_parser(
        subparsers, "features", "ACTION",
        help="feature networks (train the cached ones, list extractors)")
    tr = add_parser(fsub, "train", help="train and cache a feature network",
                    description="Train one of the cached evaluation networks: fmnist-classifier "
                                "(the Fashion-MNIST CNN; fails below 90% test accuracy), "
                                "scenes-recognizer (caption accuracy; fails below 0.95 "
                                "all-attributes accuracy on real scenes test renders), "
                                "scenes-clip (CLIP score / R-precision; fails below 0.9 "
                                "R-precision on real scenes test pairs). The scenes networks "
                                "train on all-pairs renders of Fashion-MNIST train items.")
    tr.add_argument("network", nargs="?", default="fmnist-classifier", choices=NETWORKS,
                    help="which network")
    tr.add_argument("--out", default=None,
                    help="folder for the weights; None: $CONDNOISE_CACHE or ~/.cache/condnoise")
    tr.add_argument("--epochs", type=positive_int, default=None,
                    help="training epochs; None: the network's default (fmnist-classifier 3, "
                         "scenes-recognizer 3, scenes-clip 2)")
    tr.add_argument("--num-train", type=positive_int, default=None,
                    help="training scenes (scenes networks); None: the network's default "
                         "(scenes-recognizer 60000, scenes-clip 40000)")
    tr.add_argument("--seed", type=seed_int, default=0,
                    help="random seed (training is deterministic)")
    tr.add_argument("--batch-size", type=positive_int, default=None,
                    help="mini-batch size; None: the network's default (128, 128, 256)")
    tr.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    add_progress_option(tr)
    tr.set_defaults(func=_train)
    ls = add_parser(fsub, "list", help="list the registered extractors")
    ls.set_defaults(func=_list)


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    ev = add_parser(
        subparsers, "evaluate", help="compute FID, P/R, IS, condition accuracy, ... of sample folders",
        description="Evaluate one sample folder (with samples.npz) or every s*/ sub-folder of a "
                    "`condnoise sample` output. Writes metrics.json into each sample folder "
                    "(merged with an earlier call's values on the same samples and settings) "
                    "and prints a table of all folders.")
    ev.add_argument("samples", nargs="+", help="sample folder(s), or parent(s) of s{scale}/ folders")
    ev.add_argument("--ref", default="fashion-mnist:test", help="reference data DATA[:split]")
    ev.add_argument("--train-ref", default=None,
                    help="training data for knn-l2 / memorization; None: the :train split of --ref")
    ev.add_argument("--features", default="fmnist-classifier",
                    help="comma-separated extractors: fmnist-classifier, inception, scenes-clip, "
                         "clip:PATH (a transformers CLIP folder, or a hub id with network), "
                         "or registered ones")
    ev.add_argument("--metrics", default="fid,pr,dc,is,condition-accuracy,rmd",
                    help="comma-separated: fid, sfid, pr, dc, top-pr, is, condition-accuracy, "
                         "rmd, knn-l2, memorization; for text models' folders (prompts): "
                         "clip-score, r-precision (a text-image extractor; distractor captions "
                         "from --ref), caption-accuracy (scenes prompts); entropy (VQ latent runs); "
                         "for `condnoise sample --controls-from` folders: edge-f1 (Canny controls), "
                         "mask-iou (mask controls; foreground IoU)")
    ev.add_argument("--k", type=positive_int, default=3, help="k of improved precision/recall")
    ev.add_argument("--dc-k", type=positive_int, default=5, help="k of density/coverage")
    ev.add_argument("--shrinkage", type=float_range(0, 1), default=0.0,
                    help="covariance shrinkage in [0, 1] for FID/sFID/RMD (needed when samples <= dim)")
    ev.add_argument("--max-ref", type=positive_int, default=None,
                    help="use only the first N reference images (None: all)")
    ev.add_argument("--max-train", type=positive_int, default=None,
                    help="use only the first N training images (knn-l2, memorization; None: all)")
    ev.add_argument("--memorization-threshold", type=float_range(0), default=None,
                    help="L2 threshold; None: the --memorization-percentile of reference -> train "
                         "nearest-neighbour distances")
    ev.add_argument("--memorization-percentile", type=float_range(0, 100), default=1.0,
                    help="percentile in [0, 100] used for the default memorization threshold")
    ev.add_argument("--entropy-tau", type=float_range(0, lo_open=True), default=1.0,
                    help="temperature tau of the sample entropy softmax(-||x - C_k||^2 / tau)")
    ev.add_argument("--entropy-pool", type=positive_int, default=32768,
                    help="latent vectors in the code-usage histogram (fixed: comparable across runs)")
    ev.add_argument("--edge-tolerance", type=int_range(0, 8), default=1,
                    help="edge-f1: pixels (Chebyshev distance) a generated edge may be off its input edge")
    ev.add_argument("--seed", type=seed_int, default=0,
                    help="seed of TopP&R's bootstrap and of R-precision's distractor draw")
    ev.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ev.add_argument("--replace", action="store_true",
                    help="start each metrics.json afresh; by default values of an earlier call on "
                         "the same samples and settings are kept and merged")
    ev.add_argument("--out", default=None,
                    help="also write a combined JSON of all folders to this file, with a "
                         "Markdown table (.md) and, for a guidance sweep, a figure (.png) beside it")
    add_progress_option(ev)
    ev.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    import torch

    from condnoise.locks import folder_lock
    from condnoise.paths import cache_dir

    torch.set_num_threads(args.threads)
    if args.num_train is not None and args.network == "fmnist-classifier":
        raise UserError("--num-train applies to the scenes networks only")
    out = Path(args.out) if args.out else cache_dir()
    kw = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                            ("num_train", args.num_train)) if v is not None}  # fmt: skip
    kw["progress"] = show_progress(args)
    with folder_lock(out, "features train"):
        _train_network(args.network, out, args.seed, kw)
    return 0


def _train_network(network: str, out: Path, seed: int, kw: dict) -> None:
    """Train one cached evaluation network and print its acceptance numbers."""
    if network == "fmnist-classifier":
        from condnoise.evaluation.classifier import train_classifier

        card = train_classifier(out, seed=seed, **kw)
        print(f"fmnist-classifier: test accuracy {card['test_accuracy']:.4f}, "
              f"saved to {out} ({card['train_seconds']} s)")
    elif network == "scenes-recognizer":
        from condnoise.evaluation.recognizer import train_recognizer

        card = train_recognizer(out, seed=seed, **kw)
        acc = card["accuracy"]
        print(f"scenes-recognizer: all-attributes accuracy test {acc['test']['all']:.4f}, "
              f"test-novel {acc['test-novel']['all']:.4f}, random images "
              f"{acc['random']['all']:.4f}; saved to {out} "
              f"({card['train_cpu_seconds']} CPU-s to train)")
    else:
        from condnoise.evaluation.scenes_clip import train_scenes_clip

        card = train_scenes_clip(out, seed=seed, **kw)
        r = card["real_pairs"]
        print(f"scenes-clip: R-precision test {r['test']['r_precision']:.4f}, test-novel "
              f"{r['test-novel']['r_precision']:.4f}; CLIP score real {r['test']['clip_score']:.2f}"
              f" vs shuffled {r['test']['clip_score_shuffled']:.2f}; saved to {out} "
              f"({card['train_cpu_seconds']} CPU-s to train)")


def _list(args: argparse.Namespace) -> int:
    from condnoise.evaluation.features import available_extractors

    print("\n".join([*available_extractors(), "clip:PATH"]))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from condnoise.evaluation.evaluate import (
        EvalConfig,
        evaluate_samples,
        find_sample_folders,
        load_samples,
        parse_ref,
        validate_config,
    )
    from condnoise.evaluation.records import write_metrics
    from condnoise.evaluation.summary import markdown_table
    from condnoise.locks import folder_locks
    from condnoise.provenance import environment

    cfg = EvalConfig(
        ref=args.ref, train_ref=args.train_ref, extractors=split_list(args.features, "--features"),
        metrics=split_list(args.metrics, "--metrics"), k=args.k, dc_k=args.dc_k,
        shrinkage=args.shrinkage, max_ref=args.max_ref, max_train=args.max_train,
        memorization_threshold=args.memorization_threshold,
        memorization_percentile=args.memorization_percentile, top_pr_seed=args.seed,
        entropy_tau=args.entropy_tau, entropy_pool=args.entropy_pool,
        edge_tolerance=args.edge_tolerance,
    )
    validate_config(cfg)
    if args.out and Path(args.out).suffix in (".md", ".png"):
        raise UserError(f"--out {args.out}: give the combined JSON's path (e.g. metrics_all.json); "
                        "the .md table and .png figure are written beside it")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give the combined JSON's file path")
    folders = list(dict.fromkeys(f for s in args.samples for f in find_sample_folders(s)))
    torch.set_num_threads(args.threads)
    combined = []
    with folder_locks(folders, "evaluate"):
        data = parse_ref(cfg.ref)[0]
        for folder in folders:
            samples = load_samples(folder, default_data=data)
            result = evaluate_samples(samples, cfg, progress=show_progress(args),
                                      autoencoder=_vq_autoencoder(samples, cfg)).record
            result["provenance"] = {"config": vars(cfg) | {"extractors": list(cfg.extractors),
                                                             "metrics": list(cfg.metrics)},
                                    "seed": args.seed, **environment()}
            result, note = write_metrics(folder, result, replace=args.replace)
            combined.append(result)
            summary = ", ".join(f"{m}@{e}={v:.4g}" for m, d in result["metrics"].items()
                                for e, v in d.items())
            print(f"{folder}: {summary}" + (f"\n  ({note})" if note else ""))
            for name, ceiling in result.get("details", {}).get("caption_ceiling", {}).items():
                print(f"  caption accuracy ceiling ({name}, all attributes): " + ", ".join(
                    f"{k} {v:.4f}" for k, v in ceiling.items()))
    table = markdown_table(combined)
    print("\n" + table, end="")
    if args.out:
        _write_combined(Path(args.out), combined, table)
    return 0


def _vq_autoencoder(samples, cfg):  # type: ignore[no-untyped-def]
    """The samples' run's VQ autoencoder when ``entropy`` is asked for (paper Sec. 5), else None."""
    if "entropy" not in cfg.metrics:
        return None
    from condnoise.training.runtime import load_vq_autoencoder

    return load_vq_autoencoder(samples.meta.get("run_dir"))


def _write_combined(out: Path, combined: list[dict], table: str) -> None:
    """``--out``: every folder's record as one JSON, the table beside it (.md) and, for a
    guidance sweep, the metric-vs-guidance figure (.png)."""
    from condnoise.evaluation.summary import sweep_figure
    from condnoise.io import write_bytes, write_json, write_text

    write_json(out, {"schema": "condnoise.metrics-list/1", "results": combined})
    write_text(out.with_suffix(".md"), table)
    written = [out, out.with_suffix(".md")]
    png = sweep_figure(combined)
    if png is not None:
        write_bytes(out.with_suffix(".png"), png)
        written.append(out.with_suffix(".png"))
    print("wrote " + ", ".join(map(str, written)))
