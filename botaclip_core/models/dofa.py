"""DOFA (Dynamic One-For-All) vision transformer, state-dict compatible with TorchGeo's DOFA.

The architecture follows ``torchgeo/models/dofa.py`` (Xiong et al. 2024, "Neural Plasticity-Inspired
Multimodal Foundation Model for Earth Observation") in its post-2024 layout, where the generated
patch-embedding weight is viewed as ``(bands, k, k, embed_dim)`` and permuted to a conv kernel.
Checkpoints published by TorchGeo (``dofa_{base,large}_patch16_224-*.pth``) and by the DOFA
authors (``DOFA_ViT_{base,large}_e100.pth``) load without conversion
(:mod:`botaclip_core.models.checkpoints`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from botaclip_core.errors import CatalogError, InputDataError

logger = logging.getLogger(__name__)

PATCH_SIZE = 16
IMG_SIZE = 224
WAVELENGTH_EMBED_DIM = 128
"""Width of the wavelength embedding and of the weight-generator transformer (TorchGeo's
``dynamic_embed_dim``)."""
WEIGHT_TOKENS = 128
WEIGHT_SCALER = 0.01
"""TorchGeo multiplies the generated conv weight and bias by this constant."""


@dataclass(frozen=True)
class DOFASize:
    """Width, depth and attention heads of one DOFA variant."""

    embed_dim: int
    depth: int
    num_heads: int


DOFA_SIZES: dict[str, DOFASize] = {
    # "tiny" has no published weights: it exists so that tests run in seconds
    "tiny": DOFASize(embed_dim=64, depth=2, num_heads=4),
    "small": DOFASize(embed_dim=384, depth=12, num_heads=6),
    "base": DOFASize(embed_dim=768, depth=12, num_heads=12),
    "large": DOFASize(embed_dim=1024, depth=24, num_heads=16),
}


def wavelength_embedding(dim: int, wavelengths_um: Tensor) -> Tensor:
    """1-D sine/cosine embedding of wavelengths given in micrometres, as TorchGeo computes it.

    Args:
        dim: Output width; must be even.
        wavelengths_um: Wavelengths of shape (C,), in µm; they are encoded in nanometres.

    Returns:
        Embedding of shape (C, dim): sines in the first half, cosines in the second.

    """
    positions = (wavelengths_um.to(torch.float32) * 1000).reshape(-1)
    exponent = torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**exponent
    angles = positions[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Compute MAE's fixed 2-D sine/cosine position embedding, with a zero class-token row.

    Args:
        dim: Embedding width; must be divisible by 4.
        grid_h: Patch rows.
        grid_w: Patch columns.

    Returns:
        Float32 tensor of shape (1 + grid_h * grid_w, dim), patches in row-major order.

    """
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    # MAE puts the column encoding first (its meshgrid is called with (w, h))
    patches = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).to(torch.float32)


class TransformerWeightGenerator(nn.Module):
    """Turns wavelength embeddings into the weight and bias of the patch-embedding conv."""

    def __init__(self, input_dim: int, output_dim: int, embed_dim: int, num_heads: int = 4) -> None:
        """Create the generator.

        Args:
            input_dim: Width of the wavelength embeddings and of the transformer.
            output_dim: Generated weights per band (kernel_size² × embed_dim).
            embed_dim: Generated bias length (the ViT width).
            num_heads: Attention heads of the one-layer transformer.

        """
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=input_dim,
            nhead=num_heads,
            activation="gelu",
            norm_first=False,
            batch_first=False,
            dropout=0.0,
        )
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=1, enable_nested_tensor=False
        )
        self.fc_weight = nn.Linear(input_dim, output_dim)
        self.fc_bias = nn.Linear(input_dim, embed_dim)
        self.wt_num = WEIGHT_TOKENS
        self.weight_tokens = nn.Parameter(torch.empty(WEIGHT_TOKENS, input_dim))
        self.bias_token = nn.Parameter(torch.empty(1, input_dim))
        nn.init.normal_(self.weight_tokens, std=0.02)
        nn.init.normal_(self.bias_token, std=0.02)

    def forward(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        """Generate per-band weights and the shared bias.

        Args:
            waves: Wavelength embeddings of shape (C, input_dim).

        Returns:
            Weights of shape (C, output_dim) and bias of shape (embed_dim,).

        """
        tokens = torch.cat([self.weight_tokens, waves, self.bias_token], dim=0)
        out = self.transformer_encoder(tokens)
        weights = self.fc_weight(out[self.wt_num : -1] + waves)
        bias = self.fc_bias(out[-1])
        return weights, bias


class FCResLayer(nn.Module):
    """Two ReLU linear layers with a residual connection."""

    def __init__(self, size: int) -> None:
        """Create the layer.

        Args:
            size: Input and output width.

        """
        super().__init__()
        self.w1 = nn.Linear(size, size)
        self.w2 = nn.Linear(size, size)

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``x + relu(w2(relu(w1(x))))``.

        Args:
            x: Input of shape (..., size).

        Returns:
            Output of the same shape.

        """
        return x + F.relu(self.w2(F.relu(self.w1(x))))


class DOFAEmbedding(nn.Module):
    """Wavelength-conditioned patch embedding: a conv whose kernel is generated per band."""

    def __init__(self, dynamic_embed_dim: int, kernel_size: int, embed_dim: int) -> None:
        """Create the embedding.

        Args:
            dynamic_embed_dim: Width of the wavelength embedding.
            kernel_size: Patch size (conv kernel and stride).
            embed_dim: ViT width.

        """
        super().__init__()
        self.dynamic_embed_dim = dynamic_embed_dim
        self.kernel_size = kernel_size
        self.embed_dim = embed_dim
        self.scaler = WEIGHT_SCALER
        self.weight_generator = TransformerWeightGenerator(
            dynamic_embed_dim, kernel_size * kernel_size * embed_dim, embed_dim
        )
        self.fclayer = FCResLayer(dynamic_embed_dim)
        for module in (*self.weight_generator.modules(), *self.fclayer.modules()):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0.01)

    def forward(self, x: Tensor, wavelengths_um: Tensor) -> Tensor:
        """Embed patches.

        Args:
            x: Images of shape (B, C, H, W).
            wavelengths_um: Band centre wavelengths of shape (C,), in µm.

        Returns:
            Patch features of shape (B, embed_dim, H', W').

        """
        bands = wavelengths_um.shape[0]
        k = self.kernel_size
        waves = self.fclayer(wavelength_embedding(self.dynamic_embed_dim, wavelengths_um))
        weight, bias = self.weight_generator(waves)
        kernel = weight.view(bands, k, k, self.embed_dim).permute(3, 0, 1, 2) * self.scaler
        # padding=1 with stride k is what DOFA was trained with (a 224 image still gives 14x14)
        return F.conv2d(x, kernel, bias * self.scaler, stride=k, padding=1)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        """Create the layer.

        Args:
            dim: Token width.
            num_heads: Attention heads; must divide ``dim``.

        """
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over tokens.

        Args:
            x: Tokens of shape (B, N, dim).

        Returns:
            Tokens of shape (B, N, dim).

        """
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Transformer feed-forward layer with timm's parameter names (``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        """Create the layer.

        Args:
            dim: Token width.
            hidden: Hidden width.

        """
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``fc2(gelu(fc1(x)))`` with the exact (erf) GELU.

        Args:
            x: Tokens of shape (..., dim).

        Returns:
            Tokens of the same shape.

        """
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block, state-dict compatible with ``timm.models.vision_transformer.Block``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        """Create the block.

        Args:
            dim: Token width.
            num_heads: Attention heads.
            mlp_ratio: Feed-forward width relative to ``dim``.

        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """Apply attention and feed-forward, each with a residual.

        Args:
            x: Tokens of shape (B, N, dim).

        Returns:
            Tokens of shape (B, N, dim).

        """
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DOFA(nn.Module):
    """DOFA encoder: a ViT with a wavelength-conditioned patch embedding and mean pooling.

    Only the feature extractor is kept (TorchGeo's ``global_pool=True`` path without the
    classification head): ``forward`` returns ``fc_norm(mean of patch tokens)``.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        img_size: int = IMG_SIZE,
        patch_size: int = PATCH_SIZE,
        mlp_ratio: float = 4.0,
        dynamic_embed_dim: int = WAVELENGTH_EMBED_DIM,
    ) -> None:
        """Create a randomly initialised DOFA.

        Args:
            embed_dim: Token width; must be divisible by 4 and by ``num_heads``.
            depth: Number of transformer blocks.
            num_heads: Attention heads per block.
            img_size: Input size the position embedding is laid out for.
            patch_size: Patch (and generated conv kernel) size.
            mlp_ratio: Feed-forward width relative to ``embed_dim``.
            dynamic_embed_dim: Width of the wavelength embedding.

        Raises:
            CatalogError: If the widths are inconsistent.

        """
        super().__init__()
        if embed_dim % 4 or embed_dim % num_heads:
            raise CatalogError(
                f"DOFA embed_dim={embed_dim} must be divisible by 4 and by num_heads={num_heads}"
            )
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.grid_size = (img_size + 2 - patch_size) // patch_size + 1
        self.patch_embed = DOFAEmbedding(dynamic_embed_dim, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(embed_dim, self.grid_size, self.grid_size)[None],
            requires_grad=False,
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def _patch_pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embedding of the patch tokens, resampled if the patch grid is not native."""
        pos = self.pos_embed[:, 1:]
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return pos
        logger.debug(
            "resampling DOFA position embedding from %dx%d to %dx%d patches",
            self.grid_size,
            self.grid_size,
            grid_h,
            grid_w,
        )
        square = pos.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    def forward_features(self, x: Tensor, wavelengths: Sequence[float] | Tensor) -> Tensor:
        """Encode images into one feature vector each.

        Inputs of the native size (224 px) follow TorchGeo exactly; other sizes get a bicubically
        resampled position embedding, as timm and MAE do when fine-tuning at another resolution.

        Args:
            x: Normalised images of shape (B, C, H, W), H and W at least ``patch_size - 2``.
            wavelengths: Centre wavelength of each of the C bands, in µm (e.g. 0.665 for red).

        Returns:
            Features of shape (B, embed_dim).

        Raises:
            InputDataError: If the image is not 4-D or the band count differs from the number
                of wavelengths.

        """
        waves = torch.as_tensor(wavelengths, dtype=torch.float32, device=x.device).reshape(-1)
        if x.ndim != 4 or x.shape[1] != waves.shape[0]:
            raise InputDataError(
                f"DOFA input has shape {tuple(x.shape)} but {waves.shape[0]} wavelengths "
                f"({waves.tolist()}) were given; pass images as (batch, bands, height, width) "
                "with one wavelength (µm) per band"
            )
        patches = self.patch_embed(x, waves)
        grid_h, grid_w = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2) + self._patch_pos_embed(grid_h, grid_w)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc_norm(tokens[:, 1:].mean(dim=1))

    def forward(self, x: Tensor, wavelengths: Sequence[float] | Tensor) -> Tensor:
        """Encode images; same as :meth:`forward_features`.

        Args:
            x: Normalised images of shape (B, C, H, W).
            wavelengths: Centre wavelength of each band, in µm.

        Returns:
            Features of shape (B, embed_dim).

        """
        return self.forward_features(x, wavelengths)
