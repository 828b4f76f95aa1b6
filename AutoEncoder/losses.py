"""Perceptual (MedicalNet ResNet-10, 3D) and adversarial (MONAI PatchGAN) losses.

Weights are read from a local file, never downloaded: MONAI's own PerceptualLoss fetches MedicalNet
through torch.hub, which cannot work offline, so the same network (MONAI's ResNet-10 with the
MedicalNet layout) is built here and loaded from `pretrained/`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator, resnet10
from torch import nn

from thinslice.weights import find_weights

MEDICALNET_HINT = ("MedicalNet ResNet-10 weights (resnet_10_23dataset.pth from Tencent/MedicalNet, MIT licence) "
                   "saved as {path}; or set loss.perceptual_weight: 0 to train without the perceptual loss")


def perceptual_weights_file(weights_path: str | Path) -> Path:
    """The MedicalNet file a perceptual loss needs, found as every weight file is (thinslice.weights), or an error
    that names it, where it was looked for and how to get it; the trainer asks before anything starts."""
    try:
        return find_weights(weights_path, "perceptual loss weights")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"perceptual loss: missing {weights_path}. Needs "
                                + MEDICALNET_HINT.format(path=weights_path) + f" ({e})") from None


def medicalnet_resnet10() -> nn.Module:
    return resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False)


class MedicalNetPerceptualLoss(nn.Module):
    """LPIPS-style distance on the four stages of a frozen MedicalNet ResNet-10: unit-normalised
    channel features, squared difference, averaged; inputs are z-scored per volume as MedicalNet was."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = perceptual_weights_file(weights_path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        self.net = medicalnet_resnet10()
        try:
            missing, unexpected = self.net.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{path}: not MedicalNet ResNet-10 weights ({str(e).splitlines()[-1].strip()})") from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{path}: not MedicalNet ResNet-10 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # frozen batch-norm statistics
        return self

    def _features(self, x):
        x = (x - x.mean(dim=(2, 3, 4), keepdim=True)) / (x.std(dim=(2, 3, 4), keepdim=True) + 1e-5)
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        x = n.maxpool(x)
        feats = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, recon, target):
        loss = recon.new_zeros(())
        for a, b in zip(self._features(recon), self._features(target)):
            a = F.normalize(a, dim=1, eps=1e-10)
            b = F.normalize(b, dim=1, eps=1e-10)
            loss = loss + (a - b).pow(2).sum(1).mean()
        return loss


class Adversary(nn.Module):
    """3D PatchGAN discriminator with hinge or least-squares loss and optional feature matching."""

    def __init__(self, channels: int, layers: int, criterion: str):
        super().__init__()
        self.disc = PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=1, num_layers_d=layers)
        self.loss = PatchAdversarialLoss(criterion=criterion)

    def generator_loss(self, recon, target=None, feature_matching: float = 0.0):
        fake = self.disc(recon)
        loss = self.loss(fake[-1], target_is_real=True, for_discriminator=False)
        if feature_matching and target is not None:
            with torch.no_grad():
                real = self.disc(target)
            fm = sum(F.l1_loss(f, r) for f, r in zip(fake[:-1], real[:-1])) / max(1, len(fake) - 1)
            loss = loss + feature_matching * fm
        return loss

    def discriminator_loss(self, recon, target):
        fake = self.disc(recon.detach())[-1]
        real = self.disc(target.detach())[-1]
        return 0.5 * (self.loss(fake, target_is_real=False, for_discriminator=True)
                      + self.loss(real, target_is_real=True, for_discriminator=True))
