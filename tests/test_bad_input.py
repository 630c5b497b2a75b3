"""Bad input to every command: exit code 2, one line on stderr naming the offending value or
path, no traceback, and no new or changed file anywhere the command could write.

Each case runs in-process through ``condnoise.app.cli.main(argv)``. One folder holds every
input and output of the cases (a tiny trained run, sample folders, damaged artefacts, the
feature cache); it is snapshotted (paths, sizes, modification times) before and after each
case. Locking across processes is tested in tests/test_locks.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from condnoise.app.cli import main
from condnoise.locks import LOCK_NAME, Lock


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Inputs of the cases: ``run`` (a DiT trained 2 steps on digits), ``samples/s1`` (a valid
    sample folder), damaged copies of both, a folder that is not a run, a plain file."""
    from condnoise.training import load_config, train

    root = tmp_path_factory.mktemp("bad-input")
    overrides = ["data.source=digits", "data.image_size=null", "model.size=T/2",
                 "model.hidden=32", "model.depth=1", "model.heads=2", "model.patch=2",
                 "train.steps=2", "train.batch_size=16", "train.ckpt_every=2",
                 "train.sample_every=0", "train.warmup=0", "train.threads=1",
                 "run.progress=false", "run.tensorboard=false"]  # fmt: skip
    train(load_config("fmnist-dit-s", overrides), run_dir=root / "run", device="cpu")
    _sample_folder(root / "samples" / "s1")
    for name in ("zero", "truncated", "meta", "labels"):
        _sample_folder(root / "broken" / name)
    (root / "broken" / "zero" / "samples.npz").write_bytes(b"")
    data = (root / "samples" / "s1" / "samples.npz").read_bytes()
    (root / "broken" / "truncated" / "samples.npz").write_bytes(data[: len(data) // 2])
    (root / "broken" / "meta" / "meta.json").write_text('{"guidance": 1,\n "num": }\n')
    np.savez(root / "broken" / "labels" / "samples.npz", images=np.zeros((6, 28, 28, 1), np.uint8),
             labels=np.zeros(5, np.int64))  # fmt: skip
    shutil.copytree(root / "run", root / "run-json")
    (root / "run-json" / "run.json").write_text('{"class_names": ["0",\n  "1"\n')
    shutil.copytree(root / "run", root / "run-wider")  # config.yaml edited after training
    cfg = root / "run-wider" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("hidden: 32", "hidden: 48"))
    (root / "manifests").mkdir()
    (root / "manifests" / "manifest.csv").write_text("index,original,corrupted\n")
    (root / "manifests" / "provenance.json").write_text('{"config": {}}\n')  # not a run's
    (root / "in-the-way" / "summary.json").mkdir(parents=True)  # a folder where a file goes
    (root / "afile").write_text("not a folder")
    (root / "bad.yaml").write_text("model: [family: dit\n")
    (root / "study.yaml").write_text("name: x\nseeds: [0, 0]\n")
    _vq_folder(root / "vq")
    (root / "cache").mkdir()  # the feature cache: a damaged fmnist-classifier, never trained here
    (root / "cache" / "fmnist-classifier.safetensors").write_bytes(b"\x08\x00\x00\x00junk")
    (root / "cache" / "fmnist-classifier.json").write_text('{"sha256": "0"}')
    return root


def _vq_folder(folder: Path) -> None:
    """A tiny random diffusers VQModel (8x8 images, f4)."""
    from condnoise.models.first_stage import build_first_stage

    build_first_stage("vq", in_channels=1, image_size=8, width=8, channel_mult=[1, 1, 2],
                      codebook_size=16, norm_groups=4, mid_attention=False).save_pretrained(str(folder))


def _sample_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    np.savez(folder / "samples.npz", images=np.zeros((6, 28, 28, 1), np.uint8),
             labels=np.arange(6, dtype=np.int64))  # fmt: skip
    (folder / "meta.json").write_text(json.dumps({"guidance": 1.0, "num": 6}))


SAMPLE = "sample {root}/run --out {root}/gen --num 4 --steps 2"
DISTILL = "distill lcm {root}/run --run-dir {root}/d"
FINETUNE = "finetune controlnet {root}/run --run-dir {root}/f"
WALK = "walk {root}/run --class 3 --steps 2"
EVAL = "evaluate {root}/samples/s1 --max-ref 50"
GMM = "theory gmm --d 4 --n 20 --out {root}/lab"

# (id, argv, strings the one stderr line must contain, folder locked by another holder)
CASES = [
    ("no-such-command", "bogus", ["'bogus'"], None),
    # corrupt
    ("corrupt-ratio", "corrupt digits --kind symmetric --ratio 1.5 --out {root}/c", ["--ratio", "1.5"], None),
    ("corrupt-seed", "corrupt digits --kind symmetric --ratio 0.1 --seed -1 --out {root}/c", ["--seed", "-1"], None),
    ("corrupt-kind", "corrupt digits --kind flip --ratio 0.1 --out {root}/c", ["--kind", "'flip'"], None),
    ("corrupt-class", "corrupt digits --kind asymmetric --classes 3,zebra --ratio 0.01 --out {root}/c", ["zebra"], None),
    ("corrupt-rewriter", "corrupt digits --kind symmetric --ratio 0.1 --rewriter rule --out {root}/c", ["--rewriter"], None),
    ("corrupt-source", "corrupt nosuchdata --kind symmetric --ratio 0.1 --out {root}/c", ["nosuchdata"], None),
    ("corrupt-out-file", "corrupt digits --kind symmetric --ratio 0.1 --out {root}/afile", ["{root}/afile"], None),
    ("corrupt-write-fails", "corrupt digits --kind symmetric --ratio 0.1 --force --out {root}/in-the-way",
     ["{root}/in-the-way/summary.json", "directory"], None),
    ("corrupt-locked", "corrupt digits --kind symmetric --ratio 0.1 --force --out {root}/manifests",
     ["in use by", "pid"], "{root}/manifests"),
    # data
    ("data-no-action", "data bogus", ["'bogus'"], None),
    ("data-check-dir", "data check --data-dir {root}/nothing-here", ["{root}/nothing-here"], None),
    # train
    ("train-preset", "train no-such-preset", ["no-such-preset"], None),
    ("train-yaml", "train {root}/bad.yaml --run-dir {root}/t", ["{root}/bad.yaml", "line 2 column 1"], None),
    ("train-override", "train fmnist-dit-s train.lr --run-dir {root}/t", ["'train.lr'"], None),
    ("train-key", "train fmnist-dit-s train.bogus=1 --run-dir {root}/t", ["bogus"], None),
    ("train-value", "train fmnist-dit-s train.lr=-1 --run-dir {root}/t", ["train.lr", "-1"], None),
    ("train-steps", "train fmnist-dit-s --max-steps 0 --run-dir {root}/t", ["--max-steps", "0"], None),
    ("train-ckpt", "train fmnist-dit-s --ckpt-every 0 --run-dir {root}/t", ["--ckpt-every", "0"], None),
    ("train-seed", "train fmnist-dit-s --seed -3 --run-dir {root}/t", ["--seed", "-3"], None),
    ("train-gamma", "train fmnist-dit-s --perturb cep-u --gamma -1 --run-dir {root}/t", ["--gamma", "-1"], None),
    ("train-perturb", "train fmnist-dit-s --perturb cep-x --run-dir {root}/t", ["cep-x"], None),
    ("train-device", "train fmnist-dit-s --device gpu0 --run-dir {root}/t", ["--device", "'gpu0'"], None),
    ("train-not-a-run", "train fmnist-dit-s --run-dir {root}/manifests", ["{root}/manifests", "--force"], None),
    ("train-dir-before-data", "train fmnist-dit-s data.source=imagefolder:{root}/no-images "
     "--run-dir {root}/manifests", ["{root}/manifests", "--force"], None),
    ("train-existing", "train fmnist-dit-s --run-dir {root}/run", ["{root}/run", "--resume"], None),
    ("train-resume-none", "train fmnist-dit-s --resume --run-dir {root}/t", ["{root}/t", "--resume"], None),
    ("train-resume-changed", "train fmnist-dit-s --resume --run-dir {root}/run", ["{root}/run/config.yaml"], None),
    ("train-data", "train fmnist-dit-s data.source=imagefolder:{root}/no-images --run-dir {root}/t",
     ["{root}/no-images"], None),
    ("train-corruption", "train fmnist-dit-s --corruption {root}/afile --run-dir {root}/t", ["{root}/afile"], None),
    ("train-locked", "train fmnist-dit-s --resume --run-dir {root}/run", ["in use by", "{root}/run"], "{root}/run"),
    ("train-latents", "train fmnist-dit-s data.latents={root}/manifests --run-dir {root}/t",
     ["{root}/manifests", "index.json"], None),
    # autoencoder, latents
    ("ae-train-preset", "autoencoder train no-such-preset", ["no-such-preset"], None),
    ("ae-train-steps", "autoencoder train fmnist-vq-f4 --max-steps 0 --run-dir {root}/ae", ["--max-steps", "0"], None),
    ("ae-train-key", "autoencoder train fmnist-vq-f4 loss.bogus=1 --run-dir {root}/ae", ["loss.bogus"], None),
    ("ae-train-disc-start", "autoencoder train fmnist-vq-f4 loss.disc_start=2000 --run-dir {root}/ae",
     ["loss.disc_start=2000", "train.steps=2000"], None),
    ("ae-train-not-a-run", "autoencoder train fmnist-vq-f4 --resume --run-dir {root}/manifests",
     ["{root}/manifests", "--resume"], None),
    ("ae-train-locked", "autoencoder train fmnist-vq-f4 --resume --run-dir {root}/manifests",
     ["in use by"], "{root}/manifests"),
    ("ae-eval-missing", "autoencoder eval {root}/nowhere", ["{root}/nowhere"], None),
    ("ae-eval-not-ae", "autoencoder eval {root}/run --out {root}/aee", ["{root}/run", "neither"], None),
    ("ae-eval-kind", "autoencoder eval {root}/vq --kind kl --out {root}/aee", ["{root}/vq", "VQModel"], None),
    ("ae-eval-batch", "autoencoder eval {root}/vq --batch-size 0", ["--batch-size", "0"], None),
    ("ae-eval-locked", "autoencoder eval {root}/vq --source digits --out {root}/manifests",
     ["in use by"], "{root}/manifests"),
    ("latents-no-ae", "latents extract digits --autoencoder {root}/run --out {root}/lat", ["{root}/run"], None),
    ("latents-kind", "latents extract digits --autoencoder {root}/vq --kind kl --out {root}/lat",
     ["{root}/vq", "VQModel"], None),
    ("latents-shard", "latents extract digits --autoencoder {root}/vq --out {root}/lat --shard-size 0",
     ["--shard-size", "0"], None),
    ("latents-no-out", "latents extract digits --autoencoder {root}/vq", ["--out"], None),
    ("latents-locked", "latents extract digits --autoencoder {root}/vq --out {root}/manifests",
     ["in use by"], "{root}/manifests"),
    # distill
    ("distill-no-method", "distill bogus", ["'bogus'"], None),
    ("distill-no-teacher", "distill lcm {root}/nowhere --run-dir {root}/d", ["{root}/nowhere"], None),
    ("distill-not-a-run", "distill lcm {root}/samples --run-dir {root}/d", ["{root}/samples"], None),
    ("distill-range", DISTILL + " --guidance-range 3,1", ["--guidance-range", "'3,1'"], None),
    ("distill-range-text", DISTILL + " --guidance-range x", ["--guidance-range", "'x'"], None),
    ("distill-solver", DISTILL + " --solver-steps 0", ["--solver-steps", "0"], None),
    ("distill-solver-high", DISTILL + " --solver-steps 1001", ["--solver-steps", "1001"], None),
    ("distill-embed", DISTILL + " --w-embed-dim 2", ["--w-embed-dim", "2"], None),
    ("distill-perturb", DISTILL + " --perturb dropout", ["--perturb", "'dropout'"], None),
    ("distill-huber", DISTILL + " --huber-c 0", ["--huber-c", "0"], None),
    ("distill-key", DISTILL + " train.bogus=1", ["bogus"], None),
    ("distill-arch", DISTILL + " model.hidden=48", ["model.hidden", "48", "{root}/run"], None),
    ("distill-teacher-step", DISTILL + " --teacher-step 999", ["999", "{root}/run"], None),
    ("distill-no-run-dir", "distill lcm {root}/run", ["--run-dir"], None),
    ("distill-not-a-run-dir", "distill lcm {root}/run --run-dir {root}/manifests", ["{root}/manifests", "--force"], None),
    ("distill-existing", "distill lcm {root}/run --run-dir {root}/run", ["{root}/run", "--resume"], None),
    ("distill-locked", "distill lcm {root}/run --run-dir {root}/manifests --force", ["in use by"], "{root}/manifests"),
    ("sample-lcm-teacher", SAMPLE + " --sampler lcm", ["--sampler lcm", "LCM student"], None),
    ("sample-steps-list", SAMPLE + " --steps 2,x", ["--steps", "'2,x'"], None),
    ("sample-steps-twice", SAMPLE + " --steps 2,2", ["--steps", "twice"], None),
    # sample
    ("sample-guidance", SAMPLE + " --guidance abc", ["--guidance", "'abc'"], None),
    ("sample-guidance-neg", SAMPLE + " --guidance 1,-2", ["--guidance", "-2"], None),
    ("sample-guidance-twice", SAMPLE + " --guidance 2,2.0", ["--guidance", "twice"], None),
    ("sample-num", SAMPLE + " --num 0", ["--num", "0"], None),
    ("sample-steps", SAMPLE + " --steps 0", ["--steps", "0"], None),
    ("sample-steps-high", SAMPLE + " --steps 5000", ["5000"], None),
    ("sample-batch", SAMPLE + " --batch-size 0", ["--batch-size", "0"], None),
    ("sample-shard", SAMPLE + " --shard-size -5", ["--shard-size", "-5"], None),
    ("sample-grid", SAMPLE + " --grid-per-class -1", ["--grid-per-class", "-1"], None),
    ("sample-seed", SAMPLE + " --seed -1", ["--seed", "-1"], None),
    ("sample-sampler", SAMPLE + " --sampler euler", ["--sampler", "'euler'"], None),
    ("sample-classes", SAMPLE + " --classes 3,zebra", ["'zebra'"], None),
    ("sample-step", SAMPLE + " --step 999", ["999"], None),
    ("sample-step-neg", SAMPLE + " --step -1", ["--step", "-1"], None),
    ("sample-device", SAMPLE + " --device cuda:x", ["--device", "'cuda:x'"], None),
    # validated before the model is loaded: the broken checkpoint of run-wider is never read
    ("sample-before-load", "sample {root}/run-wider --out {root}/gen --guidance abc", ["'abc'"], None),
    ("sample-classes-before-load", "sample {root}/run-wider --out {root}/gen --classes zebra",
     ["'zebra'"], None),
    ("sample-no-run", "sample {root}/nowhere --out {root}/gen", ["{root}/nowhere"], None),
    ("sample-not-a-run", "sample {root}/samples --out {root}/gen", ["{root}/samples"], None),
    ("sample-run-json", "sample {root}/run-json --out {root}/gen", ["{root}/run-json/run.json", "line 3 column 1"], None),
    ("sample-mismatch", "sample {root}/run-wider --out {root}/gen --num 2 --steps 2",
     ["parameter", "[11, 32] in the checkpoint", "[11, 48] in the model", "model.hidden"], None),
    ("sample-out-file", SAMPLE.replace("{root}/gen", "{root}/afile"), ["{root}/afile"], None),
    ("sample-out-under-file", SAMPLE.replace("{root}/gen", "{root}/afile/gen"), ["{root}/afile/gen"], None),
    ("sample-no-out", "sample {root}/run", ["--out"], None),
    ("sample-locked", SAMPLE.replace("{root}/gen", "{root}/manifests"), ["in use by"], "{root}/manifests"),
    # finetune (the root's run is a DiT: refused before any file is written)
    ("finetune-no-adapter", "finetune bogus", ["'bogus'"], None),
    ("finetune-dit-base", FINETUNE, ["{root}/run", "dit"], None),
    ("finetune-t2i-dit-base", FINETUNE.replace("controlnet", "t2i-adapter"), ["{root}/run", "dit"], None),
    ("finetune-no-base", "finetune controlnet {root}/nowhere --run-dir {root}/f", ["{root}/nowhere"], None),
    ("finetune-not-a-run", "finetune controlnet {root}/samples --run-dir {root}/f", ["{root}/samples"], None),
    ("finetune-control", FINETUNE + " --control depth", ["--control", "'depth'"], None),
    ("finetune-canny", FINETUNE + " --canny-low -1", ["--canny-low", "-1"], None),
    ("finetune-epochs", FINETUNE + " --epochs 0", ["--epochs", "0"], None),
    ("finetune-lr", FINETUNE + " --lr 0", ["--lr", "0"], None),
    ("finetune-perturb", FINETUNE + " --perturb dropout", ["--perturb", "'dropout'"], None),
    ("finetune-gamma", FINETUNE + " --perturb cep-u --gamma -1", ["--gamma", "-1"], None),
    ("finetune-t2i-type", FINETUNE.replace("controlnet", "t2i-adapter") + " --t2i-type huge",
     ["--t2i-type", "'huge'"], None),
    ("finetune-res-blocks", FINETUNE.replace("controlnet", "t2i-adapter") + " --res-blocks 0",
     ["--res-blocks", "0"], None),
    ("finetune-key", FINETUNE + " train.bogus", ["train.bogus"], None),
    ("finetune-no-run-dir", "finetune controlnet {root}/run", ["--run-dir"], None),
    # walk
    ("walk-class", "walk {root}/run --class zebra", ["'zebra'"], None),
    ("walk-before-load", "walk {root}/run-wider --class zebra", ["'zebra'"], None),
    ("walk-frames", WALK + " --frames 1", ["--frames", "1"], None),
    ("walk-rows", WALK + " --rows 0", ["--rows", "0"], None),
    ("walk-guidance", WALK + " --guidance -1", ["--guidance", "-1"], None),
    ("walk-guidance-nan", WALK + " --guidance nan", ["--guidance", "nan"], None),
    ("walk-sampler", WALK + " --sampler ddpm", ["--sampler", "'ddpm'"], None),
    ("walk-out-file", WALK + " --out {root}/afile", ["{root}/afile"], None),
    # features
    ("features-epochs", "features train --epochs 0 --out {root}/cache", ["--epochs", "0"], None),
    ("features-batch", "features train --batch-size 0 --out {root}/cache", ["--batch-size", "0"], None),
    ("features-threads", "features train --threads 0 --out {root}/cache", ["--threads", "0"], None),
    ("features-seed", "features train --seed -1 --out {root}/cache", ["--seed", "-1"], None),
    ("features-action", "features bogus", ["'bogus'"], None),
    # evaluate
    ("evaluate-k", EVAL + " --k 0", ["--k", "0"], None),
    ("evaluate-dc-k", EVAL + " --dc-k 0", ["--dc-k", "0"], None),
    ("evaluate-shrinkage", EVAL + " --shrinkage 2", ["--shrinkage", "2"], None),
    ("evaluate-max-ref-0", "evaluate {root}/samples/s1 --max-ref 0", ["--max-ref", "0"], None),
    ("evaluate-max-ref-neg", "evaluate {root}/samples/s1 --max-ref -1", ["--max-ref", "-1"], None),
    ("evaluate-max-train", EVAL + " --max-train 0", ["--max-train", "0"], None),
    ("evaluate-percentile", EVAL + " --memorization-percentile 101", ["--memorization-percentile", "101"], None),
    ("evaluate-threshold", EVAL + " --memorization-threshold -1", ["--memorization-threshold", "-1"], None),
    ("evaluate-threads", EVAL + " --threads 0", ["--threads", "0"], None),
    ("evaluate-seed", EVAL + " --seed -1", ["--seed", "-1"], None),
    ("evaluate-metric", EVAL + " --metrics fid,bogus", ["bogus"], None),
    ("evaluate-entropy-tau", EVAL + " --metrics entropy --entropy-tau 0", ["--entropy-tau", "0"], None),
    ("evaluate-entropy-pixel", "evaluate {root}/samples/s1 --metrics entropy", ["sample entropy", "run"], None),
    ("evaluate-extractor", EVAL + " --features clip-nope", ["'clip-nope'"], None),
    ("evaluate-empty-list", EVAL + " --metrics ,", ["--metrics"], None),
    ("evaluate-out-md", EVAL + " --out {root}/all.md", ["{root}/all.md"], None),
    ("evaluate-out-dir", EVAL + " --out {root}/samples", ["{root}/samples"], None),
    ("evaluate-missing", "evaluate {root}/nowhere", ["{root}/nowhere"], None),
    ("evaluate-no-samples", "evaluate {root}/manifests", ["{root}/manifests"], None),
    ("evaluate-run", "evaluate {root}/run", ["{root}/run", "training run"], None),
    ("evaluate-zero-byte", "evaluate {root}/broken/zero", ["{root}/broken/zero/samples.npz", "empty"], None),
    ("evaluate-truncated", "evaluate {root}/broken/truncated", ["{root}/broken/truncated/samples.npz"], None),
    ("evaluate-meta", "evaluate {root}/broken/meta", ["{root}/broken/meta/meta.json", "line 2 column 9"], None),
    ("evaluate-labels", "evaluate {root}/broken/labels", ["{root}/broken/labels/samples.npz", "(5,)"], None),
    ("evaluate-classifier", EVAL, ["{root}/cache", "fmnist-classifier"], None),
    ("evaluate-locked", EVAL, ["in use by", "{root}/samples/s1"], "{root}/samples/s1"),
    # theory
    ("gmm-d", GMM + " --d 0", ["--d", "0"], None),
    ("gmm-n", GMM + " --n 1", ["--n", "1"], None),
    ("gmm-gamma", GMM + " --gamma 0,-0.1", ["--gamma", "-0.1"], None),
    ("gmm-gamma-text", GMM + " --gamma 0,x", ["--gamma", "'0,x'"], None),
    ("gmm-seeds", GMM + " --seeds 0", ["--seeds", "0"], None),
    ("gmm-seed", GMM + " --seed -1", ["--seed", "-1"], None),
    ("gmm-classes", GMM + " --classes 0", ["--classes", "0"], None),
    ("gmm-weights", GMM + " --classes 2 --weights 1,2,3", ["--weights"], None),
    ("gmm-weights-neg", GMM + " --weights 1,-1", ["--weights", "-1"], None),
    ("gmm-T", GMM + " --T 0", ["--T", "0"], None),
    ("gmm-steps", GMM + " --steps 1", ["--steps", "1"], None),
    ("gmm-integrator", GMM + " --integrator rk4", ["--integrator", "'rk4'"], None),
    ("gmm-budget", GMM + " --sample-budget 0", ["--sample-budget", "0"], None),
    ("gmm-sweep-d", GMM + " --sweep-d 0", ["--sweep-d", "0"], None),
    ("gmm-sweep-max", GMM + " --sweep-gamma-max 0", ["--sweep-gamma-max", "0"], None),
    ("gmm-sweep-points", GMM + " --sweep-points 4", ["--sweep-points", "4"], None),
    ("gmm-sweep-seeds", GMM + " --sweep-seeds 1", ["--sweep-seeds", "1"], None),
    ("gmm-sgd", GMM + " --sgd-iters 0", ["--sgd-iters", "0"], None),
    ("gmm-mean-scale", GMM + " --mean-scale -1", ["--mean-scale", "-1"], None),
    ("gmm-out-file", "theory gmm --d 4 --n 20 --out {root}/afile", ["{root}/afile"], None),
    ("gmm-locked", GMM.replace("{root}/lab", "{root}/manifests"), ["in use by"], "{root}/manifests"),
    ("theory-no-lab", "theory", ["LAB"], None),
    # study / demo
    ("study-preset", "study no-such-study --out {root}/st", ["no-such-study"], None),
    ("study-yaml", "study {root}/study.yaml --out {root}/st", ["{root}/study.yaml"], None),
    ("study-stage", "study micro --stage bogus --out {root}/st", ["bogus"], None),
    ("study-set", "study micro --set seeds=[-1] --out {root}/st", ["seeds", "-1"], None),
    ("study-set-key", "study micro --set bogus=1 --out {root}/st", ["bogus"], None),
    ("study-set-form", "study micro --set seeds --out {root}/st", ["seeds"], None),
    ("study-device", "study micro --device tpu --out {root}/st", ["--device", "'tpu'"], None),
    ("study-only", "study micro --only zzz-no-cell --out {root}/st", ["zzz-no-cell"], None),
    ("demo-preset", "demo --preset no-such-study --out {root}/st", ["no-such-study"], None),
    ("demo-text-preset", "demo --text --preset micro --out {root}/st", ["--text", "scenes-quick", "micro"], None),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: (size, mtime in ns); folders (-1, 0)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file()
            else (-1, 0) for p in root.rglob("*")}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_yaml(root) -> Path:
    path = root / "tiny.yaml"
    shutil.copy(root / "run" / "config.yaml", path)
    return path


@pytest.mark.parametrize(("argv", "needles", "hold"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_exits_2_with_one_line(root, tiny_yaml, capsys, monkeypatch, argv, needles, hold):
    monkeypatch.setenv("CONDNOISE_CACHE", str(root / "cache"))
    monkeypatch.setenv("CONDNOISE_PROGRESS", "0")
    monkeypatch.chdir(root)  # a default output folder (runs/...) would show up in the snapshot
    monkeypatch.setattr("condnoise.evaluation.evaluate._EXTRACTORS", {})  # built per case
    holder = Lock(Path(hold.format(root=root)) / LOCK_NAME, "another command").acquire() \
        if hold else None  # fmt: skip
    try:
        before = _snapshot(root)
        capsys.readouterr()
        rc = main(shlex.split(argv.format(root=root)))
        out, err = capsys.readouterr()
        after = _snapshot(root)
    finally:
        if holder is not None:
            holder.release()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err, out)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert lines[0].startswith("condnoise"), lines[0]
    for needle in needles:
        assert needle.format(root=root) in lines[0], lines[0]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"files created or changed: {sorted(changed)}"


def test_every_command_has_bad_input_cases():
    from condnoise.app.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    has_sub = any(isinstance(getattr(a, "choices", None), dict) for a in sub._actions)
                    yield from commands(sub, (*prefix, name)) if has_sub else [(*prefix, name)]

    covered = {tuple(c[1].split()[:2]) for c in CASES} | {tuple(c[1].split()[:1]) for c in CASES}
    missing = [" ".join(c) for c in commands(build_parser()) if c not in covered
               and c != ("features", "list")]  # fmt: skip
    assert not missing, f"commands without a bad-input case: {missing}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: condnoise") and "COMMAND" in out
    assert main(["features"]) == 2
    assert "ACTION" in capsys.readouterr().out
