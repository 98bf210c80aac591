"""Images in and out of the pipelines, as diffusers' ``VaeImageProcessor`` converts them.

* ``postprocess``: decoded (B, C, H, W) tensors in [-1, 1] -> ``"pt"`` (B, C, H, W) in [0, 1],
  ``"np"`` (B, H, W, C) float32 in [0, 1], ``"pil"`` a list of PIL images (1-channel images become
  mode ``"L"``), or ``"latent"`` unchanged;
* ``preprocess``: PIL images, (H, W, C) / (B, H, W, C) arrays in [0, 1], or (C, H, W) / (B, C, H, W)
  tensors in [0, 1], single or in a list -> one (B, C, H, W) float tensor in [-1, 1], sized down to
  multiples of the VAE's scale factor (PIL with Lanczos, arrays and tensors with nearest).
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Union

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def numpy_to_pil(images: np.ndarray) -> list:
    """(B, H, W, C) or (H, W, C) floats in [0, 1] -> PIL images ('L' for one channel, as diffusers)."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None, ...]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {output_type!r}")


class VaeImageProcessor:
    """Converts images to and from the VAE's (B, C, H, W) [-1, 1] tensors (diffusers' defaults)."""

    def __init__(self, vae_scale_factor: int = 8, vae_latent_channels: int = 4, do_normalize: bool = True):
        self.vae_scale_factor = vae_scale_factor
        self.vae_latent_channels = vae_latent_channels
        self.do_normalize = do_normalize

    # ------------------------------------------------------------------- output

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: Optional[List[bool]] = None):
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"postprocess: expected a torch.Tensor, got {type(image).__name__}")
        check_output_type(output_type)
        if output_type == "latent":
            return image
        if do_denormalize is None:
            image = (image * 0.5 + 0.5).clamp(0, 1) if self.do_normalize else image
        else:
            image = torch.stack(
                [(image[i] * 0.5 + 0.5).clamp(0, 1) if do_denormalize[i] else image[i] for i in range(image.shape[0])]
            )
        if output_type == "pt":
            return image
        image = pt_to_numpy(image)
        if output_type == "np":
            return image
        return numpy_to_pil(image)

    # -------------------------------------------------------------------- input

    def _default_height_width(self, height: int, width: int):
        f = self.vae_scale_factor
        return height - height % f, width - width % f

    def preprocess(self, image, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
            image = [image]
        if not isinstance(image, (list, tuple)) or not image:
            raise ValueError(
                "image: expected a PIL image, a numpy array, a torch tensor, or a non-empty list of them, "
                f"got {type(image).__name__}"
            )
        kinds = {type(i) for i in image}
        first = image[0]
        if isinstance(first, Image.Image):
            if not all(isinstance(i, Image.Image) for i in image):
                raise ValueError(f"image: a list must hold one kind of image, got {sorted(k.__name__ for k in kinds)}")
            h, w = self._default_height_width(height or first.height, width or first.width)
            resized = [i.resize((w, h), resample=Image.LANCZOS, reducing_gap=None).convert("RGB") for i in image]
            array = np.stack([np.array(i).astype(np.float32) / 255.0 for i in resized], axis=0)
            tensor = torch.from_numpy(array.transpose(0, 3, 1, 2))
        elif isinstance(first, np.ndarray):
            if not all(isinstance(i, np.ndarray) for i in image):
                raise ValueError("image: a list must hold one kind of image (numpy arrays here)")
            array = np.concatenate(image, axis=0) if first.ndim == 4 else np.stack(image, axis=0)
            if array.ndim != 4:
                raise ValueError(f"image: numpy images must be (H, W, C) or (B, H, W, C), got {first.shape}")
            tensor = torch.from_numpy(array.transpose(0, 3, 1, 2).astype(np.float32, copy=False))
            tensor = self._resize_tensor(tensor, height, width)
        elif isinstance(first, torch.Tensor):
            if not all(isinstance(i, torch.Tensor) for i in image):
                raise ValueError("image: a list must hold one kind of image (tensors here)")
            tensor = torch.cat(list(image), dim=0) if first.ndim == 4 else torch.stack(list(image), dim=0)
            if tensor.ndim != 4:
                raise ValueError(f"image: tensors must be (C, H, W) or (B, C, H, W), got {tuple(first.shape)}")
            if tensor.shape[1] == self.vae_latent_channels:
                return tensor  # already latents
            tensor = self._resize_tensor(tensor, height, width)
        else:
            raise ValueError(f"image: expected PIL images, numpy arrays or torch tensors, got {type(first).__name__}")
        do_normalize = self.do_normalize
        if do_normalize and tensor.min() < 0:
            warnings.warn(
                "image: values below 0 found; images are expected in [0, 1], so this one is taken as already in "
                f"[-1, 1] (range [{tensor.min().item():.3f}, {tensor.max().item():.3f}])",
                FutureWarning,
            )
            do_normalize = False
        return 2.0 * tensor - 1.0 if do_normalize else tensor

    def _resize_tensor(self, tensor: torch.Tensor, height, width) -> torch.Tensor:
        h, w = self._default_height_width(height or tensor.shape[2], width or tensor.shape[3])
        return torch.nn.functional.interpolate(tensor, size=(h, w))


def image_batch_size(image: Union[list, "np.ndarray", torch.Tensor]) -> int:
    if isinstance(image, list):
        return len(image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return image.shape[0]
    return 1
