"""Measure the sample quality of a digits model (the embedded default model or one ``fastdiff train`` wrote).

The judge is a multinomial logistic regression fitted on the pixels of the real training split of
scikit-learn's digits (the split ``fastdiff.train`` trains on); its held-out accuracy is reported.
For generated samples it reports:

- ``mean_confidence``: the judge's mean top-class probability (real held-out images score about
  the same; an untrained model's noise scores far lower);
- class balance: the normalised entropy of the judge's predicted-class histogram (1 = uniform) and
  the largest deviation of a class share from 1/10;
- Fréchet distances to the held-out real split, on two feature spaces: the judge's 10 logits and a
  32-component PCA of the pixels (fitted on the training split). Next to them, the floor: the same
  distance between two sets of real images (the training split, scored out-of-fold for the judge
  features so that no image is scored by a judge that saw it, against the held-out split).

The same figures for an untrained model (same architecture, initialised from the same seed) are the
ceiling. Reproduce the committed figures with::

    python -m fastdiff.quality --out-prefix benchmarks/results/default_model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

NUM_CLASSES = 10
PCA_COMPONENTS = 32


def _pixels(images: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) images in [0, 1] -> (N, S*S) float64 features."""
    return images.reshape(images.shape[0], -1).double().numpy()


class DigitsJudge:
    """A logistic-regression digit classifier on pixels, plus the PCA used for pixel Fréchet distances."""

    def __init__(self, image_size: int = 16):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict

        from fastdiff.train import load_digits_split

        split = load_digits_split(image_size)
        self.image_size = image_size
        self.train_images = (split["train_images"] + 1) / 2
        self.test_images = (split["test_images"] + 1) / 2
        train_x, train_y = _pixels(self.train_images), split["train_labels"].numpy()
        test_x, test_y = _pixels(self.test_images), split["test_labels"].numpy()

        def classifier():
            return LogisticRegression(C=0.5, max_iter=5000)

        self.classifier = classifier().fit(train_x, train_y)
        self.accuracy = float((self.classifier.predict(test_x) == test_y).mean())
        # Judge features of real images that no judge saw: the held-out split, and the training
        # split scored out-of-fold (5 folds) -- the real-vs-real floor of the judge-feature distance.
        self.test_logits = self.classifier.decision_function(test_x)
        self.train_logits_out_of_fold = cross_val_predict(
            classifier(), train_x, train_y, cv=5, method="decision_function"
        )
        self.pca = PCA(n_components=PCA_COMPONENTS, random_state=0).fit(train_x)
        self.test_pca = self.pca.transform(test_x)
        self.train_pca = self.pca.transform(train_x)

    def score(self, images: torch.Tensor) -> Dict[str, float]:
        """Quality figures of ``images`` ((N, 1, S, S) in [0, 1])."""
        if images.shape[1:] != (1, self.image_size, self.image_size):
            raise ValueError(
                f"images: expected (N, 1, {self.image_size}, {self.image_size}) digits, got {tuple(images.shape)}"
            )
        x = _pixels(images)
        probs = self.classifier.predict_proba(x)
        counts = np.bincount(probs.argmax(1), minlength=NUM_CLASSES)
        share = counts / counts.sum()
        nonzero = share[share > 0]
        return {
            "num_images": int(images.shape[0]),
            "mean_confidence": float(probs.max(1).mean()),
            "class_entropy": float(-(nonzero * np.log(nonzero)).sum() / math.log(NUM_CLASSES)),
            "max_class_deviation": float(np.abs(share - 1.0 / NUM_CLASSES).max()),
            "class_counts": counts.tolist(),
            "fd_judge": frechet_distance(self.classifier.decision_function(x), self.test_logits),
            "fd_pixels_pca": frechet_distance(self.pca.transform(x), self.test_pca),
        }

    def real_floor(self) -> Dict[str, float]:
        """The same figures for real images: the held-out split scored by the judge, and the
        Fréchet distances between the training split and the held-out split."""
        figures = self.score(self.test_images)
        figures["fd_judge"] = frechet_distance(self.train_logits_out_of_fold, self.test_logits)
        figures["fd_pixels_pca"] = frechet_distance(self.train_pca, self.test_pca)
        figures["num_images"] = f"{self.train_images.shape[0]} train vs {self.test_images.shape[0]} held-out"
        return figures


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, D) feature sets."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the FID reference code does
        offset = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def per_item_generators(seed: int, start: int, count: int, device="cpu"):
    """One generator per image, seeded ``seed + index``: an image depends on its index, never on
    how images are batched or split across processes."""
    return [torch.Generator(device).manual_seed(seed + i) for i in range(start, start + count)]


@torch.no_grad()
def sample_digits(pipe, num_images: int, seed: int = 0, num_inference_steps: int = 50, batch_size: int = 250) -> torch.Tensor:
    """(num_images, 1, S, S) samples in [0, 1] from an unconditional pipeline, image i seeded ``seed + i``."""
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        out = pipe(
            batch_size=count,
            generator=per_item_generators(seed, start, count),
            num_inference_steps=num_inference_steps,
            output_type="pt",
        )
        chunks.append(out.images.float().cpu())
    return torch.cat(chunks)


def untrained_pipeline(image_size: int = 16, seed: int = 0):
    """The default architecture, freshly initialised from ``seed``: the ceiling of every distance."""
    from fastdiff.pipelines import DDIMPipeline
    from fastdiff.train import build_model

    unet, scheduler = build_model(image_size, seed)
    return DDIMPipeline(unet=unet.eval(), scheduler=scheduler)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 4) -> str:
    """A PNG grid of (N, C, H, W) images in [0, 1], each upscaled ``scale`` times (nearest), 2 px gaps."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    pad = 2
    grid = torch.ones(c, nrows * (h * scale + pad) + pad, ncol * (w * scale + pad) + pad)
    big = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
        grid[:, y : y + h * scale, x : x + w * scale] = big[i]
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if c == 1 else array).save(path)
    return path


def evaluate(model: Optional[str] = None, num_samples: int = 1000, num_inference_steps: int = 50, seed: int = 0, with_ceiling: bool = True) -> dict:
    """All the figures for the pipeline folder ``model`` (the embedded default model by default)."""
    from fastdiff.default_model import DEFAULT_MODEL
    from fastdiff.pipelines import DiffusionPipeline

    model = model or DEFAULT_MODEL
    pipe = DiffusionPipeline.from_pretrained(model)
    image_size = pipe.unet.config.sample_size
    judge = DigitsJudge(image_size)
    began = time.perf_counter()
    samples = sample_digits(pipe, num_samples, seed, num_inference_steps)
    result = {
        "model": os.path.relpath(model) if os.path.isabs(model) else model,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "judge": {"kind": "LogisticRegression(C=0.5) on 16x16 pixels", "held_out_accuracy": judge.accuracy,
                  "train_images": int(judge.train_images.shape[0]), "held_out_images": int(judge.test_images.shape[0])},
        "model_figures": judge.score(samples),
        "real_floor": judge.real_floor(),
        "sampling_seconds": round(time.perf_counter() - began, 1),
    }
    if with_ceiling:
        untrained = sample_digits(untrained_pipeline(image_size, seed), num_samples, seed, num_inference_steps)
        result["untrained_ceiling"] = judge.score(untrained)
    result["samples"] = samples
    return result


def markdown_table(result: dict) -> str:
    rows = [("trained (shipped)", result["model_figures"]), ("real images (floor)", result["real_floor"])]
    if "untrained_ceiling" in result:
        rows.append(("untrained (ceiling)", result["untrained_ceiling"]))
    lines = [
        f"Judge: {result['judge']['kind']}, held-out accuracy {result['judge']['held_out_accuracy']:.3f} "
        f"({result['judge']['held_out_images']} images). Samples: {result['model_figures']['num_images']}, "
        f"DDIM {result['num_inference_steps']} steps, image i seeded {result['seed']} + i.",
        "",
        "| images | mean top-class confidence | class entropy (1 = uniform) | max class-share deviation | Fréchet (judge logits) | Fréchet (pixel PCA-32) |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        lines.append(
            f"| {name} | {f['mean_confidence']:.3f} | {f['class_entropy']:.3f} | {f['max_class_deviation']:.3f} | "
            f"{f['fd_judge']:.2f} | {f['fd_pixels_pca']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(result: dict, prefix: str) -> None:
    """PREFIX_quality.json (figures and environment), PREFIX_quality.md (the table) and PREFIX_samples.png."""
    from fastdiff.benchmark import environment

    result = dict(result)
    samples = result.pop("samples")
    result["environment"] = environment()
    with open(prefix + "_quality.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    command = (
        f"python -m fastdiff.quality --num-samples {result['model_figures']['num_images']} "
        f"--steps {result['num_inference_steps']} --seed {result['seed']} --out-prefix {prefix}"
    )
    with open(prefix + "_quality.md", "w", encoding="utf-8") as f:
        f.write("# Sample quality of the embedded default model\n\n" + markdown_table(result) + f"\nReproduce: `{command}`\n")
    save_grid(samples[:64], prefix + "_samples.png")
    print(f"wrote {prefix}_quality.json, {prefix}_quality.md and {prefix}_samples.png", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a digits pipeline folder (default: the embedded model)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the untrained-model ceiling")
    parser.add_argument("--out-prefix", default=None, help="write PREFIX_quality.json, PREFIX_quality.md and PREFIX_samples.png")
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.num_samples, args.steps, args.seed, with_ceiling=not args.no_ceiling)
    print(markdown_table(result))
    if args.out_prefix:
        write_results(result, args.out_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
