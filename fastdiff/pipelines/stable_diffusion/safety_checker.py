"""``StableDiffusionSafetyChecker``: the CLIP-based NSFW filter of Stable Diffusion, with diffusers' behaviour.

Same module names and parameters as diffusers' class (a ``transformers`` ``PreTrainedModel`` on a
``CLIPConfig``), so the ``safety_checker`` folder of a Stable Diffusion checkpoint loads unchanged.

How it decides (CompVis' filter): the image's CLIP embedding is compared (cosine similarity) with
17 concept embeddings and 3 "special care" embeddings, each with its own threshold. If any special
care score (similarity minus threshold, rounded to 3 decimals) is positive, every concept threshold
drops by 0.01; an image with a positive concept score is flagged, and replaced by a black image.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

try:
    from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel
except ImportError:
    raise ImportError("the safety checker needs the transformers package: pip install 'fastdiff[text]'") from None

logger = logging.getLogger(__name__)


def _cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosine similarities, as float32 numpy."""
    sim = nn.functional.normalize(a) @ nn.functional.normalize(b).t()
    return sim.cpu().float().numpy()


class StableDiffusionSafetyChecker(PreTrainedModel):
    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(17, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, config.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)
        self.post_init()

    def flagged(self, clip_input: torch.Tensor) -> list:
        """Whether each image (CLIP pixel values, (B, 3, S, S)) is flagged."""
        image_embeds = self.visual_projection(self.vision_model(clip_input)[1])
        special = _cosine_similarity(image_embeds, self.special_care_embeds)
        concepts = _cosine_similarity(image_embeds, self.concept_embeds)
        special_thresholds = self.special_care_embeds_weights.detach().cpu().float().numpy()
        concept_thresholds = self.concept_embeds_weights.detach().cpu().float().numpy()
        flags = []
        for i in range(image_embeds.shape[0]):
            special_scores = np.round(special[i] - special_thresholds, 3)
            adjustment = np.float32(0.01) if (special_scores > 0).any() else np.float32(0.0)
            concept_scores = np.round(concepts[i] - concept_thresholds + adjustment, 3)
            flags.append(bool((concept_scores > 0).any()))
        return flags

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):
        """Returns ``(images, has_nsfw_concepts)``; flagged images are replaced by zeros (black), in place."""
        has_nsfw_concepts = self.flagged(clip_input)
        for idx, flagged in enumerate(has_nsfw_concepts):
            if flagged:
                if torch.is_tensor(images) or torch.is_tensor(images[0]):
                    images[idx] = torch.zeros_like(images[idx])
                else:
                    images[idx] = np.zeros(images[idx].shape)
        if any(has_nsfw_concepts):
            logger.warning(
                "Potential NSFW content was detected in one or more images; a black image is returned instead. "
                "Try again with a different prompt and/or seed."
            )
        return images, has_nsfw_concepts
