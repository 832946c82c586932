"""The trained model as one file another lab can predict with: model_bundle.pt holds the trunk's id and
weights source, every weight of trunk and head, the class names, the preprocessing, the temperature,
the open-set score and its unknown threshold, the per-class routing thresholds, the kNN reference
embeddings with their labels, the settings, and a SHA-256 of all of it. predict.py runs from it alone
(PREDICT_BUNDLE), without the training images, the split or the checkpoints; see docs/bundle.md.

    python export_model.py                      # after train.py (run_all.py runs it after calibration.py)
    python predict.py --PREDICT_BUNDLE=outputs/model_bundle/model_bundle.pt --PREDICT_DIR=/new/images

Reads:  checkpoints/best.pth, outputs/split.csv, the train and val images (through the trunk cache),
        exactly as predict.py does (bundles.fit_from_run).
Writes: outputs/model_bundle/model_bundle.pt (plankton/bundles.py owns its format; read back and
        checked before anything else is written), outputs/model_bundle/README.txt (what it holds, its
        SHA-256 and the commands to run it), with EXPORT_ONNX=True outputs/model_bundle/model.onnx
        (trunk + head -> logits and embeddings; its logits are compared with PyTorch's on validation
        images), and last outputs/provenance_export_model.json.
"""
import sys
from pathlib import Path

import numpy as np
import torch

import dataloader
from plankton import bundles, checkpoints, fileio, hashing, locations, provenance, registry, runner

ONNX_CHECK_IMAGES = 8  # validation images whose ONNX logits are compared with PyTorch's
ONNX_TOLERANCE = 1e-4  # largest absolute logit difference called equal


def onnx_difference(model: torch.nn.Module, trained: checkpoints.TrainedModel, onnx_path: Path) -> tuple[float, int]:
    """(largest absolute difference of the logits, images compared): PyTorch on the CPU against
    onnxruntime, on the first ONNX_CHECK_IMAGES validation images."""
    dataset = trained.source("val").dataset
    count = min(ONNX_CHECK_IMAGES, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    with torch.no_grad():
        expected, _ = model.cpu().float().eval()(images)
    logits, _ = bundles.onnx_outputs(onnx_path, images.numpy())
    return float(np.abs(logits - expected.numpy()).max()), count


def describe(bundle: bundles.Bundle, path: Path, onnx_note: str) -> str:
    """README.txt: what the bundle holds and how another lab runs it."""
    cp, pre, ref = bundle.checkpoint, bundle.checkpoint.preprocess, bundle.reference
    thresholds = ", ".join(f"{name} {'never' if np.isinf(t) else f'{t:.3g}'}" for name, t in
                           zip(bundle.class_thresholds.class_name, bundle.class_thresholds.threshold))
    return f"""Model bundle (export_model.py): everything predict.py needs, in one file.

file            {path.name}, {path.stat().st_size:,} bytes, SHA-256 {hashing.sha256_file(path)}
content SHA-256 {bundle.sha256} (checked each time the file is opened)
trunk           {cp.trunk}, weights: {cp.weights_source}
classes ({len(cp.class_names)})     {', '.join(cp.class_names)}
images          {pre.image_size} x {pre.image_size} px ({pre.resize_mode}), RGB scaled to 0..1, then normalised with
                mean {list(pre.mean)} std {list(pre.std)}
scores          softmax(logits / {bundle.temperature:.4g}) (temperature {bundle.temperature_note})
unknown         open-set score {bundle.score!r} above {bundle.threshold:.4g}, the threshold that keeps
                {bundle.val_kept:.1%} of {bundle.val_images} validation images (PREDICT_KEEP {bundle.keep:g})
kNN reference   {len(ref.train_embeddings)} training embeddings ({ref.metric}, k = {ref.k})
routing         per-class score thresholds for precision {bundle.route_precision:g}: {thresholds}
made from       best.pth SHA-256 {bundle.checkpoint_sha256}
                split.csv SHA-256 {bundle.split_sha256}, code version {bundle.code_version}
ONNX            {onnx_note}

On another machine, with this pipeline's code installed (git clone, then pip install -r requirements.txt):

    python predict.py --PREDICT_BUNDLE=/path/to/{path.name} --PREDICT_DIR=/new/images --OUTPUT_DIR=predictions_run

No data folder, split or checkpoints are needed; predictions land in predictions_run/predictions/.
More in docs/bundle.md.
"""


def run(cfg) -> None:
    registry.require_task("export_model", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "export_model", [paths.best, paths.split])
    fitted = bundles.fit_from_run(cfg, trained, trained.trunk_cache(cfg, paths, runtime), runtime)
    fileio.own_folder(paths.bundle_dir)  # never a link: the bundle would land where it points
    bundle_path, readme, onnx_path = [paths.out / name for name in registry.stage("export_model").outputs]
    fileio.save_torch(bundles.bundle_record(cfg, trained, fitted), bundle_path)
    bundle = bundles.open_bundle(bundle_path)  # read back as another lab will: every check, the hash
    onnx_note = "not exported (EXPORT_ONNX=False)"
    if cfg.EXPORT_ONNX:
        bundles.export_onnx(trained.model, bundle.checkpoint.preprocess.image_size, onnx_path)
        difference, compared = onnx_difference(trained.model, trained, onnx_path)
        size = bundle.checkpoint.preprocess.image_size
        onnx_note = (f"{onnx_path.name}: input 'images' (N x 3 x {size} x {size}, normalised as above), outputs "
                     f"'logits', 'embeddings'; "
                     f"largest logit difference from PyTorch on {compared} validation images {difference:.2g}")
        if difference > ONNX_TOLERANCE:
            print(f"warning: {onnx_path.name}'s logits differ from PyTorch's by up to {difference:.2g} "
                  f"(more than {ONNX_TOLERANCE:g})", file=sys.stderr)
    else:
        onnx_path.unlink(missing_ok=True)  # an earlier run's would no longer match the bundle
    with fileio.atomic_path(readme) as tmp:
        tmp.write_text(describe(bundle, bundle_path, onnx_note), encoding="utf-8")
    written = [p for p in (bundle_path, readme, onnx_path) if p.is_file()]
    provenance.save_provenance(paths, "export_model", inputs, written, cfg)
    print(f"model bundle: {len(bundle.checkpoint.class_names)} classes, trunk {bundle.checkpoint.trunk}, "
          f"{len(bundle.reference.train_embeddings)} reference embeddings, content SHA-256 {bundle.sha256[:12]}…")
    print("-> " + ", ".join(map(str, written)))


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
