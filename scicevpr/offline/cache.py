"""The backbone cache of the offline notebooks: a CPU economy for small runs, passed by its user.

The notebooks, ``scicevpr claims`` and ``scicevpr train-offline`` create one
:class:`BackboneCache` and pass it as ``cache=`` to :func:`scicevpr.evaluate.evaluate`,
:func:`scicevpr.stability.stability_features` / :func:`~scicevpr.stability.batch_stability` and
:func:`scicevpr.train.train_teacher` / :func:`~scicevpr.train.train_student`. Without it (the
default everywhere, and what a GPU user runs) nothing is hashed or kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from typing import Callable

import torch

from ..weights import hash_tensors, tensor_bytes


class BackboneCache:
    """Backbone outputs of evaluation batches, kept for reuse within the session.

    An entry is keyed by everything the output depends on: the backbone's weights (a hash of
    every parameter and buffer, adapters included, with names, dtypes and shapes), the settings
    its modules hold besides tensors (training mode, norms' eps, CricaVPR's ``adapter_scale``,
    the backbone's configuration with its ``interpolate_offset``), the code that
    computes the output (the model class's ``backbone_output`` and its ``layers``), the input
    batch (a hash of its bytes, so also its order and size), the autocast state and torch's
    thread count. A hit is therefore the output of the identical computation. Only inference
    uses it (no autograd graph is kept); the oldest entries are dropped beyond ``max_bytes``.

    It pays where the same images pass the same weights again: the validation split after every
    epoch of a frozen backbone, several heads on one backbone (a teacher and its student, the
    ablations) evaluated on one split, and training runs on one frozen backbone that draw the
    same batches (a student's epochs are its teacher's first ones: the same seed gives the same
    places and augmentations). It costs memory (an entry is the (B, M*C, H, W) output: about
    0.4 MB an image for SciceVPR-S at 112 px, 3 MB for SciceVPR-B at 224 px) and a hash of the
    weights per pass (:meth:`extractor`); ``max_bytes=0`` keeps nothing.
    """

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = 0
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self.enable(max_bytes)

    def __repr__(self) -> str:
        return (f"BackboneCache(max_bytes={self.max_bytes}, entries={len(self.entries)}, "
                f"bytes={self.num_bytes}, hits={self.hits}, misses={self.misses})")

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def enable(self, max_bytes: int) -> None:
        """Keep up to ``max_bytes`` of backbone outputs (0 turns the cache off and empties it)."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: expected >= 0 (0 turns the cache off)")
        self.max_bytes = int(max_bytes)
        self._evict()

    def clear(self) -> None:
        """Drop every entry and reset the counts."""
        self.entries.clear()
        self.num_bytes = self.hits = self.misses = 0

    @staticmethod
    def weights_key(model: torch.nn.Module) -> str:
        """A digest of what the backbone output of ``model`` (a :class:`~scicevpr.models.VPRModel`)
        depends on besides its input."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{type(model).backbone_output.__qualname__} {tuple(model.config.layers)}".encode())
        for name, m in model.backbone.named_modules():
            # plain settings (training mode, e.g. of CricaVPR's adapter BatchNorms; eps; adapter_scale;
            # the BackboneConfig): two backbones with equal weights can differ by them
            settings = sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and (
                isinstance(v, (bool, int, float, str, tuple)) or dataclasses.is_dataclass(v)))
            h.update(f"{name} {type(m).__qualname__} {settings}".encode())
        hash_tensors(h, (*model.backbone.named_parameters(), *model.backbone.named_buffers()), with_layout=True)
        return h.hexdigest()

    def backbone_features(self, model: torch.nn.Module, x: torch.Tensor, weights_key: str) -> torch.Tensor:
        """``model.backbone_features(x)``, from the cache when this exact computation was done
        before. ``weights_key``: :meth:`weights_key` of ``model``, hashed once for a pass during
        which the backbone does not change. An output that autograd needs (a backbone training,
        as CricaVPR's adapters do) is never cached."""
        if not self.enabled or (torch.is_grad_enabled() and any(p.requires_grad for p in model.backbone.parameters())):
            return model.backbone_features(x)
        h = hashlib.blake2b(tensor_bytes(x), digest_size=16)
        amp = torch.is_autocast_enabled(x.device.type)
        key = (weights_key, h.hexdigest(), str(x.dtype), tuple(x.shape), str(x.device), amp,
               str(torch.get_autocast_dtype(x.device.type)) if amp else None, torch.get_num_threads())
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        out = model.backbone_features(x)
        self.entries[key] = out
        self.num_bytes += out.element_size() * out.nelement()
        self._evict()
        return out

    def extractor(self, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> model.extract_features(x)`` with the backbone's part through this cache when it
        is enabled (:class:`scicevpr.evaluate.FeatureCache`). The weights are hashed here, once: use
        the function for one pass (an evaluation, a training run on a frozen backbone) during
        which the backbone does not change."""
        if not self.enabled or not hasattr(model, "after_backbone"):
            return model.extract_features
        weights_key = self.weights_key(model)
        return lambda x: model.after_backbone(self.backbone_features(model, x, weights_key))

    def _evict(self) -> None:
        while self.entries and self.num_bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.num_bytes -= old.element_size() * old.nelement()
